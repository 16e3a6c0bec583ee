"""Trainer: learning, checkpoints (safetensors + JSON, no pickle), resume, events, stop, early
stopping, input errors and DDP with two gloo processes. Tiny model, tiny dataset, CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from _datasets import make_tiny_dataset

from lsms_core.train import (
    TrainConfig,
    Trainer,
    flatten_state,
    unflatten_state,
    warmup_cosine,
)

SAFETENSORS_FILES = ("model.safetensors", "last.safetensors", "last_state.safetensors")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """4 cases: 2 train (22 items: 3 steps per epoch at batch 8), 1 val, 1 test."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", cases=4)


@pytest.fixture()
def small_config(tiny_config):
    """The tiny model at 32 x 32 pixels: the machine is small and shared."""
    return dataclasses.replace(tiny_config, image_size=32)


def fast_config(**overrides) -> TrainConfig:
    """A few-steps CPU config (no augmentation unless asked)."""
    fields = dict(
        epochs=1,
        batch_size=8,
        lr=3e-3,
        warmup_steps=0,
        device="cpu",
        checkpoint_every_steps=2,
        patience=None,
        augment=False,
        val_max_items=4,
        val_batch_size=8,
        log_every_steps=1,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def run(model_config, data_dir, out, **kwargs):
    """Fit and return (summary, events); events are collected unless a callback is given."""
    events: list[dict] = []
    callback = kwargs.pop("callback", events.append)
    train_config = kwargs.pop("train_config", fast_config())
    trainer = Trainer(model_config, train_config, data_dir, out, callback=callback, **kwargs)
    return trainer.fit(), events


def load_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_safetensors_file(path: Path) -> None:
    """A safetensors file: 8-byte little-endian header length + a JSON header whose tensors fill the
    rest of the file exactly; never a pickle/zip. (A first byte 0x80 is no sign of a pickle here:
    it is the low byte of the header length.)"""
    raw = path.read_bytes()
    assert raw[:2] != b"PK", f"{path.name} looks like a torch.save zip file"
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert 8 + header_len <= len(raw), f"{path.name} looks like a pickle, not safetensors"
    header = json.loads(raw[8 : 8 + header_len])
    assert isinstance(header, dict) and header
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    assert 8 + header_len + max(ends, default=0) == len(raw)


# ------------------------------------------------------------------------------------------ config


def test_train_config_round_trip_and_validation():
    config = TrainConfig(epochs=3, max_steps=10, lr=1e-3, warmup_steps=0.1, patience=2)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.warmup_for(50) == 5 and TrainConfig(warmup_steps=7).warmup_for(50) == 7
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="crowded_repeat"):
        TrainConfig(crowded_repeat=0)
    with pytest.raises(ValueError, match="decidable_only"):
        TrainConfig(decidable_only="yes")


def test_crowded_repeat_reaches_the_training_items(small_config, data_dir, tmp_path):
    """The Trainer hands ``crowded_repeat`` to its SliceDataset: more items per epoch."""
    items = {}
    for repeat in (1, 2):
        train_config = fast_config(max_steps=1, crowded_repeat=repeat)
        _, events = run(small_config, data_dir, tmp_path / f"x{repeat}", train_config=train_config)
        items[repeat] = next(e for e in events if e["event"] == "start")["train_items"]
    assert items[2] > items[1] == 22, items


def test_decidable_only_reaches_the_training_set(small_config, data_dir, tmp_path):
    config = fast_config(max_steps=1, decidable_only=True)
    trainer = Trainer(small_config, config, data_dir, tmp_path / "d")
    assert trainer._build_train_set(trainer._resolve_model_config()).decidable_only


def test_warmup_cosine_schedule_shape():
    values = [warmup_cosine(s, 4, 20) for s in range(20)]
    assert values[:4] == sorted(values[:4]) and values[3] < 1.0  # rising warm-up
    assert math.isclose(values[4], 1.0)
    assert values[4:] == sorted(values[4:], reverse=True) and values[-1] < 0.05  # cosine decay


def test_flatten_state_round_trip_resumes_adamw_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    skeleton, tensors = flatten_state(opt.state_dict())
    save_file(tensors, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(skeleton))

    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.5)
    restored = unflatten_state(
        json.loads((tmp_path / "state.json").read_text()), load_file(str(tmp_path / "state.safetensors"))
    )
    twin_opt.load_state_dict(restored)
    assert twin_opt.param_groups[0]["betas"] == (0.8, 0.9) and twin_opt.param_groups[0]["lr"] == 0.1
    x = torch.randn(5, 4)
    for model, optimizer in ((net, opt), (twin, twin_opt)):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ training


def test_loss_decreases_on_a_repeated_batch(small_config, tmp_path):
    # One training case -> all its items fit in one batch, so every step sees the same batch.
    data = make_tiny_dataset(tmp_path / "one", cases=3, splits={"train": ["case00"], "val": ["case01"]})
    config = fast_config(max_steps=10, batch_size=32, lr=1e-2, checkpoint_every_steps=None, val_max_items=2)
    summary, events = run(small_config, data, tmp_path / "out", train_config=config)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 10 and summary["step"] == 10
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_fit_writes_safetensors_checkpoints_events_and_log(small_config, data_dir, tmp_path):
    from lsms_core.checkpoint import load_model

    out = tmp_path / "run"
    summary, events = run(small_config, data_dir, out, train_config=fast_config(epochs=2))
    for name in SAFETENSORS_FILES:
        assert_safetensors_file(out / name)
    assert not list(out.glob("*.pt")) and not list(out.glob("*.pkl")) and not list(out.glob(".*tmp*"))

    steps_per_epoch = events[0]["steps_per_epoch"]
    assert steps_per_epoch == 3  # 22 train items, batch 8
    assert summary["reason"] == "completed" and summary["step"] == 2 * steps_per_epoch
    assert summary["model_path"] == str(out / "model.safetensors")

    # event sequence: start, steps 1..N in order, a validation after each epoch, end last
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "stopped" not in kinds
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 2 * steps_per_epoch + 1))
    assert [e["step"] for e in events if e["event"] == "validation"] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 3, 4, 6]
    for e in events:
        json.dumps(e)  # JSON-serialisable
        assert {"event", "step", "total_steps", "epoch", "elapsed_s"} <= set(e)
    step = next(e for e in events if e["event"] == "step")
    assert {"loss", "loss_parts", "lr"} <= set(step) and "seg" in step["loss_parts"]
    assert [e["epoch"] for e in events if e["event"] == "step"] == [1, 1, 1, 2, 2, 2]
    validation = next(e for e in events if e["event"] == "validation")
    assert "mIoU" in validation["metrics"]["overall"]

    # the log holds the same events as JSON lines
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in logged] == kinds

    # sidecars: the best model has metrics + fingerprint + train config; last.json the training state
    card = json.loads((out / "model.json").read_text())
    assert card["format"] == "lsms-model" and "mIoU" in card["metrics"]
    assert card["data_fingerprint"] and card["extra"]["train_config"]["epochs"] == 2
    state = json.loads((out / "last.json").read_text())["extra"]["training_state"]
    assert state["step"] == summary["step"] and state["finished"] is True
    model = load_model(out / "model.safetensors")
    assert model.config.image_size == small_config.image_size


def test_training_decodes_each_case_once(small_config, data_dir, tmp_path, monkeypatch):
    """By default every train/val case stays in memory: two epochs read each CT file once."""
    import lsms_core.data.dataset as dataset_module

    reads: list[str] = []
    real_read = dataset_module.read_volume

    def counting_read(path, *args, **kwargs):
        reads.append(Path(path).parent.name)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "read_volume", counting_read)
    run(small_config, data_dir, tmp_path / "cached", train_config=fast_config(epochs=2))
    assert reads and len(reads) == len(set(reads)) == 3  # 2 train + 1 val cases, once each

    reads.clear()  # a cache of one case re-reads while alternating between the two train cases
    run(small_config, data_dir, tmp_path / "small", train_config=fast_config(epochs=2, cache_cases=1))
    assert len(reads) > 3
    with pytest.raises(ValueError, match="cache_cases"):
        TrainConfig(cache_cases=-1)


def test_resume_after_interruption_matches_uninterrupted_run(small_config, data_dir, tmp_path):
    config = fast_config(max_steps=5, checkpoint_every_steps=2, augment=True)
    full, _ = run(small_config, data_dir, tmp_path / "full", train_config=config)

    def crash_at_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        run(small_config, data_dir, tmp_path / "resumed", train_config=config, callback=crash_at_step_3)
    state = json.loads((tmp_path / "resumed" / "last.json").read_text())["extra"]["training_state"]
    assert state["step"] == 2 and not state["finished"]

    resumed, events = run(small_config, data_dir, tmp_path / "resumed", train_config=config)
    assert events[0]["event"] == "start" and events[0]["resumed"] is True
    assert [e["step"] for e in events if e["event"] == "step"] == [3, 4, 5]
    assert resumed["step"] == full["step"] == 5
    a = load_tensors(tmp_path / "full" / "last.safetensors")
    b = load_tensors(tmp_path / "resumed" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    # running again on a finished folder trains nothing more
    again, events = run(small_config, data_dir, tmp_path / "resumed", train_config=config)
    assert again["step"] == 5 and not [e for e in events if e["event"] == "step"]


def test_stop_request_checkpoints_and_can_resume(small_config, data_dir, tmp_path):
    out = tmp_path / "run"
    events: list[dict] = []

    summary, _ = run(
        small_config, data_dir, out, callback=events.append,
        should_stop=lambda: any(e["event"] == "step" for e in events),
    )  # fmt: skip
    assert summary["reason"] == "stopped" and summary["step"] == 1
    assert events[-1]["event"] == "stopped" and events[-2]["event"] == "checkpoint"
    state = json.loads((out / "last.json").read_text())["extra"]["training_state"]
    assert state["step"] == 1

    # the STOP file, as the napari widget writes it, during the resumed run's first step
    events.clear()

    def touch_stop(event):
        events.append(event)
        if event["event"] == "step":
            (out / "STOP").write_text("")

    summary, _ = run(small_config, data_dir, out, callback=touch_stop)
    assert summary["reason"] == "stopped" and summary["step"] == 2
    assert events[-1]["event"] == "stopped"

    # the stale STOP file does not stop the next run, which completes the epoch
    summary, events = run(small_config, data_dir, out)
    assert summary["reason"] == "completed" and summary["step"] == 3
    assert [e["step"] for e in events if e["event"] == "step"] == [3]
    assert not (out / "STOP").exists()


def test_early_stopping_when_validation_does_not_improve(small_config, data_dir, tmp_path):
    # A vanishing learning rate: the metric cannot improve after the first validation.
    config = fast_config(epochs=5, batch_size=16, lr=1e-12, patience=1)
    summary, events = run(small_config, data_dir, tmp_path / "run", train_config=config)
    validations = [e for e in events if e["event"] == "validation"]
    assert summary["reason"] == "early_stopping"
    assert [v["improved"] for v in validations] == [True, False]
    assert summary["step"] == 2 * events[0]["steps_per_epoch"] < events[0]["total_steps"]
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "early_stopping"
    assert summary["best_step"] == events[0]["steps_per_epoch"]


def test_best_model_is_the_best_validation_not_the_last_and_nan_never_wins(
    small_config, data_dir, tmp_path, monkeypatch, one_torch_thread
):
    """Scripted validation scores (the real metric is replaced) while the weights really train:
    OUT/model.safetensors and model.json must be those of the best validation, a NaN score keeps a
    first model but never beats a finite one, and counts as no improvement for early stopping."""
    import lsms_core.evaluate as evaluate_module

    nan = float("nan")
    # None (no score) reads as NaN; the 1.0 is never reached: patience runs out first
    scores = iter([nan, 0.5, 0.9, 0.7, None, 1.0])
    scored: list[dict] = []  # the weights each validation saw, in order

    def scripted_evaluate(model, dataset, split="test", **kwargs):
        scored.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"split": split, "overall": {"mIoU": next(scores)}, "per_kind": {}}

    monkeypatch.setattr(evaluate_module, "evaluate_model", scripted_evaluate)
    out = tmp_path / "run"
    cards: list[dict] = []  # model.json as it stood right after each validation
    events: list[dict] = []

    def callback(event):
        events.append(event)
        if event["event"] == "validation":
            cards.append(json.loads((out / "model.json").read_text()))

    # 22 train items in one batch: one step per epoch, so one validation per step
    config = fast_config(epochs=6, batch_size=32, lr=1e-2, patience=2, checkpoint_every_steps=None)
    summary, _ = run(small_config, data_dir, out, train_config=config, callback=callback)

    validations = [e for e in events if e["event"] == "validation"]
    assert events[0]["steps_per_epoch"] == 1 and len(scored) == len(validations) == 5
    assert [v["step"] for v in validations] == [1, 2, 3, 4, 5]
    assert [v["improved"] for v in validations] == [True, True, True, False, False]
    assert [v["best_step"] for v in validations] == [1, 2, 3, 3, 3]
    assert [v["best"] for v in validations] == [None, 0.5, 0.9, 0.9, 0.9]  # NaN is never the best
    assert [v["value"] for v in validations] == [None, 0.5, 0.9, 0.7, None]
    # the card is rewritten exactly when the validation improved, and records that step
    assert [c["metrics"]["step"] for c in cards] == [1, 2, 3, 3, 3]
    assert [c["extra"]["step"] for c in cards] == [1, 2, 3, 3, 3]
    assert [c["metrics"]["mIoU"] for c in cards] == [None, 0.5, 0.9, 0.9, 0.9]

    # two validations without improvement (0.7, then NaN) -> early stop before the last epoch
    assert summary["reason"] == "early_stopping" and summary["step"] == 5 < events[0]["total_steps"]
    assert summary["best_step"] == 3 and summary["best_metric"] == 0.9
    card = json.loads((out / "model.json").read_text())
    assert card["metrics"]["step"] == card["extra"]["step"] == summary["best_step"]
    assert card["metrics"]["mIoU"] == summary["best_metric"] == 0.9
    assert card["metrics"]["split"] == validations[0]["metrics"]["split"] == "val"

    best = load_tensors(out / "model.safetensors")
    last = load_tensors(out / "last.safetensors")
    at_best, at_last = scored[2], scored[4]  # the weights validated at steps 3 and 5
    assert best and best.keys() == last.keys() and set(best) <= set(at_best)
    for key in best:
        torch.testing.assert_close(best[key], at_best[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(last[key], at_last[key], rtol=0, atol=0, msg=key)
    # the learning rate is large enough that training moved the weights after the best step
    changed = [k for k in best if best[k].is_floating_point() and not torch.equal(best[k], last[k])]
    assert len(changed) > len(best) // 2, changed


def test_fine_tune_from_saved_model(small_config, data_dir, tmp_path):
    from lsms_core.checkpoint import save_model
    from lsms_core.model import LSMS

    base = save_model(LSMS(small_config), tmp_path / "base.safetensors")
    requested = dataclasses.replace(
        small_config,
        embed_dims=(8, 8, 8, 8),
        presence_weight=0.5,
        distractor_weight=3.0,
        contrastive_distractors=True,
        image_size=64,
    )
    summary, events = run(
        requested, data_dir, tmp_path / "ft", train_config=fast_config(max_steps=1), init_from=base
    )
    assert events[0]["init_from"] == str(base) and summary["step"] == 1
    card = json.loads((tmp_path / "ft" / "model.json").read_text())
    # the saved architecture wins, the training fields come from the requested config
    assert card["config"]["embed_dims"] == list(small_config.embed_dims)
    assert card["config"]["presence_weight"] == 0.5 and card["config"]["distractor_weight"] == 3.0
    assert card["config"]["contrastive_distractors"] is True
    assert card["config"]["image_size"] == 64  # the input size may change: the weights work at any size


def test_fine_tune_can_grow_a_saved_model_with_the_refinement_head(small_config, data_dir, tmp_path):
    from lsms_core.checkpoint import load_model, save_model
    from lsms_core.model import LSMS

    torch.manual_seed(0)
    base = save_model(LSMS(small_config), tmp_path / "base.safetensors")
    saved = load_model(base)
    requested = dataclasses.replace(small_config, refine_head=True, refine_dim=4)
    trainer = Trainer(requested, fast_config(max_steps=1), data_dir, tmp_path / "ft", init_from=base)
    grown = trainer._build_model(trainer._resolve_model_config(), torch.device("cpu")).eval()
    assert grown.config.refine_head and grown.config.refine_dim == 4
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # the grown model starts exactly where the saved one was
        torch.testing.assert_close(grown(images, "the lesion").logits, saved(images, "the lesion").logits)
    summary = trainer.fit()
    assert summary["step"] == 1
    card = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert card["config"]["refine_head"] is True
    assert any(k.startswith("refine_head.") for k in load_tensors(tmp_path / "ft" / "model.safetensors"))
    assert load_model(tmp_path / "ft" / "model.safetensors").refine_head is not None


def _grow_and_train(saved_config, requested, data_dir, tmp_path, steps: int = 2):
    """Fine-tune a saved model of ``saved_config`` into ``requested``: check that the grown model
    answers exactly as the saved one (masks and presence), train ``steps`` steps; returns
    ``(grown model before training, the run's last model)``."""
    from lsms_core.checkpoint import load_model, save_model
    from lsms_core.model import LSMS

    torch.manual_seed(0)
    base = save_model(LSMS(saved_config), tmp_path / "base.safetensors")
    saved = load_model(base).eval()
    trainer = Trainer(requested, fast_config(max_steps=steps), data_dir, tmp_path / "ft", init_from=base)
    grown = trainer._build_model(trainer._resolve_model_config(), torch.device("cpu")).eval()
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected, got = saved(images, "the lesion"), grown(images, "the lesion")
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.presence_logits, expected.presence_logits)
    assert trainer.fit()["step"] == steps
    return grown, load_model(tmp_path / "ft" / "last.safetensors")


def test_fine_tune_can_grow_a_saved_model_with_relation_attention(small_config, data_dir, tmp_path):
    """The relation layers start as no-ops (the same masks and presence as the saved model), then
    train: their zero-initialised outputs move."""
    requested = dataclasses.replace(small_config, relation_attention=True, relation_layers=1)
    grown, tuned = _grow_and_train(small_config, requested, data_dir, tmp_path)
    assert grown.config.relation_attention and len(grown.relation_attention.layers) == 1
    assert tuned.config.relation_attention and tuned.config.relation_layers == 1
    assert tuned.relation_attention.layers[0].out.weight.abs().sum() > 0
    assert tuned.relation_attention.layers[0].ffn[2].weight.abs().sum() > 0


def test_fine_tune_can_grow_a_saved_model_with_attention_pooling(small_config, data_dir, tmp_path):
    """The pooling starts as the mean of the words (the same masks and presence as the saved
    model, up to float rounding), then trains: its zero-initialised scores move."""
    requested = dataclasses.replace(small_config, attention_pooling=True, attention_pooling_heads=2)
    grown, tuned = _grow_and_train(small_config, requested, data_dir, tmp_path)
    assert grown.attention_pooling.heads == 2 and tuned.config.attention_pooling_heads == 2
    assert tuned.attention_pooling.score.weight.abs().sum() > 0


def test_fine_tune_can_grow_a_saved_model_with_an_appearance_head(small_config, tmp_path):
    """The appearance head changes no answer of the saved model; it trains on the lesion types the
    data records (its loss is logged), and data that records none is refused before any work."""
    typed = make_tiny_dataset(tmp_path / "typed", cases=4, lesion_types=True)
    requested = dataclasses.replace(small_config, appearance_head=True, appearance_weight=1.0)
    grown, tuned = _grow_and_train(small_config, requested, typed, tmp_path, steps=6)
    assert grown.appearance_head is not None and tuned.config.appearance_head
    terms = [
        json.loads(line)["loss_parts"]["appearance"]
        for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()
        if '"event": "step"' in line
    ]
    assert len(terms) == 6 and all(t > 0 for t in terms)
    assert min(terms[-2:]) < terms[0]  # it learns the types
    untyped = make_tiny_dataset(tmp_path / "untyped", cases=4)
    with pytest.raises(ValueError, match="records lesion types"):
        Trainer(requested, fast_config(max_steps=1), untyped, tmp_path / "refused").fit()
    assert not (tmp_path / "refused" / "last.safetensors").exists()


def test_fine_tune_can_widen_a_saved_model_to_more_adjacent_slices(small_config, data_dir, tmp_path):
    """3 -> 5 slices with the refinement head (whose last conv also reads the input): the widened
    model answers exactly as the saved one whatever the new outer slices hold, then trains."""
    from lsms_core.checkpoint import load_model, save_model
    from lsms_core.model import LSMS
    from lsms_core.train import merge_fine_tune_config

    torch.manual_seed(0)
    three = dataclasses.replace(small_config, in_slices=3, refine_head=True, refine_dim=4)
    base = save_model(LSMS(three), tmp_path / "base.safetensors")
    saved = load_model(base).eval()
    five = dataclasses.replace(three, in_slices=5)
    trainer = Trainer(five, fast_config(max_steps=1), data_dir, tmp_path / "ft", init_from=base)
    widened = trainer._build_model(trainer._resolve_model_config(), torch.device("cpu")).eval()
    assert widened.config.in_slices == 5
    middle = torch.rand(2, 3, 32, 32)
    outer = torch.rand(2, 1, 32, 32) * 5.0
    images = torch.cat([outer, middle, -outer], dim=1)
    with torch.no_grad():
        expected = saved(middle, "the lesion")
        got = widened(images, "the lesion")
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.presence_logits, expected.presence_logits)
    assert trainer.fit()["step"] == 1
    assert load_model(tmp_path / "ft" / "model.safetensors").config.in_slices == 5
    # fewer slices than the model has are not applied (the saved value wins and is reported)
    merged, dropped = merge_fine_tune_config(five.to_dict(), three.to_dict())
    assert merged["in_slices"] == 5 and dropped == ["in_slices"]


def test_fine_tune_can_deepen_a_saved_model(small_config, data_dir, tmp_path):
    """More SVLA blocks per stage: the new blocks start as identities (same masks and presence as
    the saved model), then train; fewer blocks than the model has are not applied."""
    from lsms_core.train import deepened, merge_fine_tune_config

    shallow = dataclasses.replace(small_config, depths=(1, 1, 1, 1))
    deep = dataclasses.replace(shallow, depths=(1, 2, 1, 3))
    grown, tuned = _grow_and_train(shallow, deep, data_dir, tmp_path)
    assert [len(stage) for stage in grown.encoder.stages] == [1, 2, 1, 3]
    assert tuned.config.depths == (1, 2, 1, 3)
    # the new blocks left identity: their residual outputs were trained
    assert tuned.encoder.stages[3][2].proj_out.weight.abs().sum() > 0
    assert tuned.encoder.stages[1][1].ffn.fc2.weight.abs().sum() > 0
    assert deepened(deep, shallow) and not deepened(shallow, deep) and not deepened(deep, deep)
    assert not deepened(dataclasses.replace(deep, depths=(2, 1, 1, 3)), deep)  # one stage grows, one shrinks
    merged, dropped = merge_fine_tune_config(deep.to_dict(), shallow.to_dict())
    assert tuple(merged["depths"]) == (1, 2, 1, 3) and dropped == ["depths"]


def test_growable_switches_only_turn_on(small_config):
    from lsms_core.train import GROWABLE_FIELDS, switched_on

    with_head = dataclasses.replace(small_config, refine_head=True)
    assert switched_on(with_head, small_config) == ["refine_head"]
    assert switched_on(small_config, with_head) == []  # a saved module is never dropped
    assert switched_on(with_head.to_dict(), with_head) == []
    assert set(GROWABLE_FIELDS) == {
        "refine_head",
        "refine_dim",
        "relation_attention",
        "relation_layers",
        "appearance_head",
        "appearance_classes",
        "attention_pooling",
        "attention_pooling_heads",
    }


# ------------------------------------------------------------------------------------------ errors


def test_bad_training_data_fails_before_any_work(small_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(small_config, fast_config(), tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no dataset.json"):
        Trainer(small_config, fast_config(), tmp_path / "empty", tmp_path / "out")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json"):
        Trainer(small_config, fast_config(), tmp_path / "broken", tmp_path / "out")

    no_train = make_tiny_dataset(tmp_path / "no_train", cases=3, splits={"train": [], "val": ["case00"]})
    with pytest.raises(ValueError, match="'train' split .* has no cases"):
        Trainer(small_config, fast_config(), no_train, tmp_path / "out")

    no_expr = make_tiny_dataset(tmp_path / "no_expr", cases=3)
    (no_expr / "expressions.jsonl").write_text("")
    with pytest.raises(ValueError, match="no referring expressions"):
        Trainer(small_config, fast_config(), no_expr, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_init_from_a_file_that_is_not_a_model(small_config, data_dir, tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not an LSMS model"):
        Trainer(small_config, fast_config(), data_dir, tmp_path / "out", init_from=fake)
    with pytest.raises(FileNotFoundError):
        Trainer(
            small_config,
            fast_config(),
            data_dir,
            tmp_path / "out",
            init_from=tmp_path / "missing.safetensors",
        )


def test_empty_val_split_validates_on_train_with_warning(small_config, tmp_path):
    data = make_tiny_dataset(tmp_path / "d", cases=2, splits={"train": ["case00", "case01"], "val": []})
    with pytest.warns(UserWarning, match="validating on the 'train' split"):
        trainer = Trainer(small_config, fast_config(max_steps=1), data, tmp_path / "out")
    assert trainer.val_split == "train"


# ------------------------------------------------------------------------------------------ DDP


def _gloo_teardown_abort(stderr: str, out: Path) -> bool:
    """Whether a failed torchrun died in C++ teardown after the run ended (its log says "end")."""
    if "terminate called without an active exception" not in stderr:
        return False
    log = out / "log.jsonl"
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()] if log.exists() else []
    return events[-1:] == ["end"]


@pytest.mark.slow
def test_ddp_two_gloo_processes_write_one_model(small_config, data_dir, tmp_path):
    spec = {
        "model": small_config.to_dict(),
        "train": fast_config(max_steps=2, val_max_items=2).to_dict(),
    }
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "lsms_core.train", "--data", str(data_dir), "--out", str(out), "--config-json", str(config_file),
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=170, env=env)

    out = tmp_path / "ddp"
    result = run(out)
    if result.returncode != 0 and _gloo_teardown_abort(result.stderr, out):
        # Once in CI (0 of 60 runs on this machine), a rank hit std::terminate in torch's C++ code
        # after the run had ended and written everything. One fresh run, and say so.
        message = f"a torchrun rank aborted after the run ended; rerunning once:\n{result.stderr[-1500:]}"
        warnings.warn(message, stacklevel=1)
        out = tmp_path / "ddp_again"
        result = run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 2  # only rank 0 prints
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(SAFETENSORS_FILES)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = logged[0]
    assert start["event"] == "start" and start["world_size"] == 2
    assert [e["event"] for e in logged].count("start") == 1  # rank 1 writes nothing
    # each rank sees half of the items per epoch
    assert start["steps_per_epoch"] == math.ceil(math.ceil(start["train_items"] / 2) / 8)


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_finishes_the_run(small_config, data_dir, tmp_path):
    """A real crash: SIGKILL the training process after a checkpoint, run the same command again."""
    spec = {
        "model": small_config.to_dict(),
        "train": fast_config(max_steps=40, checkpoint_every_steps=2, val_max_items=2).to_dict(),
    }
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(spec))
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "lsms_core.train", "--data", str(data_dir), "--out", str(out),
        "--config-json", str(config_file),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        killed_after = None
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "last.json").exists():
                step = json.loads((out / "last.json").read_text())["extra"]["training_state"]["step"]
                if step >= 4:
                    proc.send_signal(signal.SIGKILL)
                    killed_after = step
                    break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_after is not None and proc.returncode == -signal.SIGKILL, (
        "the run ended before it could be killed"
    )
    for name in SAFETENSORS_FILES[1:]:
        assert_safetensors_file(out / name)  # the checkpoint written before the kill is whole

    result = subprocess.run(command, capture_output=True, text=True, timeout=170, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 40
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    starts = [e for e in logged if e["event"] == "start"]
    assert starts[-1].get("resumed") and starts[-1]["step"] >= killed_after


# ------------------------------------------------------------------------------------------ review fixes


def test_monitor_is_checked_when_the_config_is_built():
    from lsms_core.train import monitor_metrics

    with pytest.raises(ValueError, match=r"TrainConfig.monitor='miou'.*mIoU"):
        TrainConfig(monitor="miou")
    with pytest.raises(ValueError, match="monitor"):
        TrainConfig.from_dict({"monitor": "accuracy"})
    expected = {"mIoU", "oIoU", "dice", "P@0.5", "negative_accuracy", "presence_accuracy"}
    assert expected <= set(monitor_metrics())
    for name in ("dice", "P@0.7", "presence_accuracy"):
        assert TrainConfig(monitor=name).monitor == name


def _final_weights(out):
    return load_tensors(out / "last.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_crash_between_checkpoint_files_resumes_from_a_consistent_checkpoint(
    small_config, data_dir, tmp_path, monkeypatch
):
    import lsms_core.checkpoint as checkpoint_module
    import lsms_core.train as train_module

    # checkpoints at steps 2, 3 (epoch end) and 4
    config = fast_config(max_steps=5, checkpoint_every_steps=2, augment=True)
    full, _ = run(small_config, data_dir, tmp_path / "full", train_config=config)
    expected = _final_weights(tmp_path / "full")

    # 1. disk full after the optimizer state of step 4 was written, before its weights and last.json
    out = tmp_path / "disk_full"
    real_write_weights = checkpoint_module.write_weights

    def write_weights(model, path, metadata=None):
        if metadata and metadata.get("step") == "4":
            raise OSError(28, "No space left on device")
        return real_write_weights(model, path, metadata)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "write_weights", write_weights)
        with pytest.raises(OSError, match="No space left"):
            run(small_config, data_dir, out, train_config=config)
    state = json.loads((out / "last.json").read_text())["extra"]["training_state"]
    assert state["step"] == 3  # the previous checkpoint (epoch end) is still the committed one
    assert (out / "last_state-step00000004.safetensors").is_file()  # the uncommitted first file
    resumed, events = run(small_config, data_dir, out, train_config=config)
    assert events[0]["resumed"] and [e["step"] for e in events if e["event"] == "step"] == [4, 5]
    assert resumed["step"] == 5
    _assert_same_weights(_final_weights(out), expected)
    assert not list(out.glob("*-step*.safetensors")), "step-tagged files were left behind"

    # 2. killed after last.json of step 4 was committed, before its files got their final names
    out = tmp_path / "after_commit"
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == "last-step00000004.safetensors":
            raise KeyboardInterrupt("simulated kill")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(train_module.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            run(small_config, data_dir, out, train_config=config)
    assert (out / "last-step00000004.safetensors").is_file()
    resumed, events = run(small_config, data_dir, out, train_config=config)
    assert [e["step"] for e in events if e["event"] == "step"] == [5]
    _assert_same_weights(_final_weights(out), expected)
    assert not list(out.glob("*-step*.safetensors"))


def _stop_after(n_steps):
    events: list[dict] = []

    def should_stop():
        return sum(e["event"] == "step" for e in events) >= n_steps

    return events, should_stop


def test_checkpoints_of_the_older_three_file_layout_still_resume(small_config, data_dir, tmp_path, caplog):
    """Older lsms_core wrote last.safetensors without a step in its header and no commit point."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = fast_config(max_steps=4, checkpoint_every_steps=None, augment=True)
    full, _ = run(small_config, data_dir, tmp_path / "full", train_config=config)

    def strip_step(path):
        with safe_open(str(path), framework="pt") as fh:
            meta = {k: v for k, v in (fh.metadata() or {}).items() if k != "step"}
        save_file(load_tensors(path), str(path), metadata=meta)

    def stopped_run(out, n_steps):
        events, should_stop = _stop_after(n_steps)
        summary, _ = run(small_config, data_dir, out, train_config=config, callback=events.append,
                         should_stop=should_stop)  # fmt: skip
        assert summary["reason"] == "stopped" and summary["step"] == n_steps

    # a whole old checkpoint resumes exactly
    stopped_run(tmp_path / "old", 2)
    strip_step(tmp_path / "old" / "last.safetensors")
    summary, events = run(small_config, data_dir, tmp_path / "old", train_config=config)
    assert [e["step"] for e in events if e["event"] == "step"] == [3, 4]
    _assert_same_weights(_final_weights(tmp_path / "old"), _final_weights(tmp_path / "full"))

    # an old checkpoint killed between its writes (optimizer state one step newer than last.json)
    # resumes from last.json's step with a warning instead of refusing
    stopped_run(tmp_path / "torn", 2)
    stopped_run(tmp_path / "newer", 3)
    (tmp_path / "torn" / "last_state.safetensors").write_bytes(
        (tmp_path / "newer" / "last_state.safetensors").read_bytes()
    )
    strip_step(tmp_path / "torn" / "last.safetensors")
    with caplog.at_level("WARNING", logger="lsms_core.train"):
        summary, events = run(small_config, data_dir, tmp_path / "torn", train_config=config)
    assert "disagree" in caplog.text and "not bit-exact" in caplog.text
    assert summary["reason"] == "completed" and [e["step"] for e in events if e["event"] == "step"] == [3, 4]


def test_resume_refuses_a_different_recipe_but_may_extend_the_run(small_config, data_dir, tmp_path):
    out = tmp_path / "run"
    config = fast_config(max_steps=2)
    events, should_stop = _stop_after(1)
    summary, _ = run(small_config, data_dir, out, train_config=config, callback=events.append,
                     should_stop=should_stop)  # fmt: skip
    assert summary["step"] == 1

    for changes, named in (
        ({"batch_size": 4}, ["batch_size (saved 8, now 4)"]),
        ({"seed": 1, "monitor": "dice"}, ["seed", "monitor"]),
        ({"lr": 1e-4, "augment": True}, ["lr", "augment"]),
        ({"max_steps": 1}, ["fewer total steps", "max_steps (saved 2, now 1)"]),
        ({"crowded_repeat": 2}, ["crowded_repeat (saved 1, now 2)"]),
    ):
        with pytest.raises(ValueError, match="cannot resume") as info:
            run(small_config, data_dir, out, train_config=dataclasses.replace(config, **changes))
        for text in named:
            assert text in str(info.value)
    state = json.loads((out / "last.json").read_text())["extra"]["training_state"]
    assert state["step"] == 1  # nothing was trained by the refused attempts

    # A checkpoint written before a field existed had that field's default.
    card = json.loads((out / "last.json").read_text())
    del card["extra"]["training_state"]["train_config"]["crowded_repeat"]
    (out / "last.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=re.escape("crowded_repeat (saved 1, now 2)")):
        run(small_config, data_dir, out, train_config=dataclasses.replace(config, crowded_repeat=2))

    # more steps, another patience and run-time settings are fine
    longer = dataclasses.replace(config, max_steps=3, patience=2, log_every_steps=2, val_every=2, amp=False)
    summary, events = run(small_config, data_dir, out, train_config=longer)
    assert events[0]["resumed"] and summary["step"] == 3 and summary["reason"] == "completed"


def test_fine_tuning_a_model_with_its_encoder_beside_it_saves_loadable_models(
    small_config, tiny_encoder_dir, data_dir, tmp_path, monkeypatch
):
    import shutil

    from lsms_core.checkpoint import load_model, save_model
    from lsms_core.model import LSMS

    shutil.copytree(tiny_encoder_dir, tmp_path / "base" / "encoder")
    base = save_model(LSMS(small_config), tmp_path / "base" / "base.safetensors")
    card = json.loads((tmp_path / "base" / "base.json").read_text())
    card["config"]["text_encoder"] = "encoder"  # shipped beside the model
    (tmp_path / "base" / "base.json").write_text(json.dumps(card))
    load_model(base)  # found beside it

    monkeypatch.chdir(tmp_path)
    summary, _ = run(
        None, data_dir, "ft", train_config=fast_config(max_steps=1), init_from="base/base.safetensors"
    )
    assert summary["step"] == 1
    encoder = str((tmp_path / "base" / "encoder").resolve())
    for name in ("model.json", "last.json"):
        assert json.loads((tmp_path / "ft" / name).read_text())["config"]["text_encoder"] == encoder

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name in ("model.safetensors", "last.safetensors"):
        assert load_model(tmp_path / "ft" / name).config.text_encoder == encoder
    again, events = run(None, data_dir, tmp_path / "ft", train_config=fast_config(max_steps=1),
                        init_from=tmp_path / "base" / "base.safetensors")  # fmt: skip
    assert events[0]["resumed"] and again["step"] == 1


class _AugmentationDraws(torch.utils.data.Dataset):
    """Each item is one draw of ``augmentation_rng``, like SliceDataset's augmentation."""

    def __init__(self, n, seed):
        import numpy as np

        self.n = n
        self.augmentation_rng = np.random.default_rng(seed + 1)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"index": index, "draw": float(self.augmentation_rng.random())}


def test_dataloader_workers_draw_their_own_augmentations(small_config, data_dir, tmp_path):
    import numpy as np

    def draws(num_workers, epoch):
        config = fast_config(batch_size=1, num_workers=num_workers)
        trainer = Trainer(small_config, config, data_dir, tmp_path)
        trainer.device = torch.device("cpu")
        dataset = _AugmentationDraws(8, seed=0)
        batches = list(trainer._epoch_batches(dataset, epoch, 0))
        return [float(b["draw"][0]) for b in batches], dataset

    epoch0, _ = draws(2, 0)
    assert len(set(epoch0)) == 8, "the two workers repeated each other's augmentations"
    epoch1, _ = draws(2, 1)
    assert not set(epoch0) & set(epoch1), "an epoch repeated the previous epoch's augmentations"
    assert draws(2, 0)[0] == epoch0  # still reproducible

    # num_workers=0 (the default recipe): the main generator's draws, in order, as before
    main, dataset = draws(0, 0)
    assert main == np.random.default_rng(1).random(8).tolist()
    assert dataset.augmentation_rng.bit_generator.state != np.random.default_rng(1).bit_generator.state
