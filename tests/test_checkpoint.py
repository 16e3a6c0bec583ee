"""Model files: save/load round trip, sidecar, clear errors for bad files, the model registry."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lsms_core import checkpoint
from lsms_core.checkpoint import list_models, load_model, save_model


def _edit_card(path, **changes):
    card_file = checkpoint.sidecar_path(path)
    card = json.loads(card_file.read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            card["config"][key.split(".", 1)[1]] = value
        else:
            card[key] = value
    card_file.write_text(json.dumps(card))


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(
        2, model.config.in_slices, model.config.image_size, model.config.image_size, generator=g
    )
    with torch.inference_mode():
        return model(images, ["the large lesion", "all lesions"]).logits


def test_round_trip_reproduces_outputs_and_writes_sidecar(tiny_model, tmp_path):
    tiny_model.eval()
    path = save_model(
        tiny_model, tmp_path / "m", metrics={"dice": 0.5}, data_fingerprint="abc", version="1.2"
    )
    assert path == tmp_path / "m.safetensors" and path.is_file()

    card = json.loads((tmp_path / "m.json").read_text())
    assert card["format"] == "lsms-model" and card["format_version"] == 1
    assert card["metrics"] == {"dice": 0.5} and card["data_fingerprint"] == "abc" and card["version"] == "1.2"
    assert card["config"] == tiny_model.config.to_dict()
    assert card["code_version"].startswith(__import__("lsms_core").__version__)
    assert card["includes_text_encoder"] is False  # the tiny config's encoder is frozen
    assert not list(tmp_path.glob(".*tmp*")), "atomic writes left temporary files"

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and not any(k.startswith("text_encoder.") for k in keys)

    loaded = load_model(path)
    assert not loaded.training
    assert loaded.model_card["version"] == "1.2"
    np.testing.assert_allclose(_forward(loaded).numpy(), _forward(tiny_model).numpy(), rtol=1e-5, atol=1e-6)


def test_trainable_text_encoder_is_stored_and_restored(tiny_config, tmp_path):
    from lsms_core.model import LSMS

    tiny_config.text_trainable = "full"
    model = LSMS(tiny_config)
    with torch.no_grad():  # make the encoder differ from the one in its folder
        for p in model.text_encoder.parameters():
            p.add_(0.01)
    path = save_model(model, tmp_path / "ft.safetensors")
    assert json.loads((tmp_path / "ft.json").read_text())["includes_text_encoder"] is True

    loaded = load_model(path)
    for (name, a), (_, b) in zip(
        model.text_encoder.state_dict().items(), loaded.text_encoder.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_last_k_model_stores_only_its_trainable_text_layers(tiny_config, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lsms_core.model import LSMS

    tiny_config.text_trainable, tiny_config.text_trainable_layers = "last_k", 1
    model = LSMS(tiny_config)
    with torch.no_grad():  # fine-tuned: the last layer differs from the encoder's folder
        for p in model.text_encoder.encoder.layer[-1].parameters():
            p.add_(0.01)
    path = save_model(model, tmp_path / "ft.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        text_names = {k for k in fh.keys() if k.startswith("text_encoder.")}
    last = "text_encoder.encoder.layer.1."
    assert text_names and all(k.startswith(last) for k in text_names)
    assert text_names == {
        "text_encoder." + k for k in model.text_encoder.state_dict() if k.startswith("encoder.layer.1.")
    }

    loaded = load_model(path)  # the first layer from the folder, the last from the file
    for name, value in model.text_encoder.state_dict().items():
        assert torch.equal(value, loaded.text_encoder.state_dict()[name]), name
    np.testing.assert_allclose(_forward(loaded).numpy(), _forward(model.eval()).numpy(), rtol=1e-5, atol=1e-6)

    # a file of an earlier version held the whole encoder: it still loads
    whole = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    save_file(whole, str(path), metadata={"format": "pt", checkpoint._META_FORMAT_KEY: checkpoint.FORMAT})
    loaded = load_model(path)
    assert torch.equal(
        loaded.text_encoder.encoder.layer[-1].output.dense.weight,
        model.text_encoder.encoder.layer[-1].output.dense.weight,
    )


def test_a_fine_tuned_encoder_never_overwrites_a_shared_one(tiny_config, tmp_path):
    from lsms_core.model import LSMS

    frozen = save_model(LSMS(tiny_config), tmp_path / "frozen.safetensors")
    tiny_config.text_trainable = "full"
    tuned = LSMS(tiny_config)
    with torch.no_grad():
        for p in tuned.text_encoder.parameters():
            p.add_(0.01)
    tuned_path = save_model(tuned, tmp_path / "tuned.safetensors")

    first = load_model(frozen)
    before = {k: v.clone() for k, v in first.text_encoder.state_dict().items()}
    second = load_model(tuned_path, text_encoder=first.text_encoder, tokenizer=first.tokenizer)
    for name, value in first.text_encoder.state_dict().items():  # the shared encoder is untouched
        assert torch.equal(value, before[name]), name
    assert not any(p.requires_grad for p in first.text_encoder.parameters())
    for name, value in tuned.text_encoder.state_dict().items():  # the loaded model has its own
        assert torch.equal(value, second.text_encoder.state_dict()[name]), name
    third = load_model(frozen, text_encoder=first.text_encoder, tokenizer=first.tokenizer)
    assert third.text_encoder is first.text_encoder  # frozen models still share


def test_not_an_lsms_model(tiny_model, tmp_path):
    fake = tmp_path / "random.safetensors"
    fake.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="sidecar random.json is missing"):
        load_model(fake)

    path = save_model(tiny_model, tmp_path / "m.safetensors")
    _edit_card(path, format="something-else")
    with pytest.raises(ValueError, match="not an LSMS model card"):
        load_model(path)

    checkpoint.sidecar_path(path).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(path)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_corrupted_weights(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated download
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_model(path)


def test_config_that_does_not_match_the_weights(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    _edit_card(path, **{"config.in_slices": tiny_model.config.in_slices + 2})
    with pytest.raises(ValueError, match=r"do not match the config.*shape mismatches: \S+") as info:
        load_model(path)
    assert "file [" in str(info.value) and "vs config [" in str(info.value)


def test_missing_text_encoder_folder(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    _edit_card(path, **{"config.text_encoder": str(tmp_path / "gone")})
    with pytest.raises(FileNotFoundError, match="text-encoder folder .*gone.* is missing"):
        load_model(path)


def test_no_default_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "default.safetensors")
    with pytest.raises(FileNotFoundError, match="no default LSMS model"):
        load_model()


def test_registry_lists_default_and_home_models_newest_first(tiny_model, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LSMS_HOME", str(home))
    assert checkpoint.models_home() == home
    default = save_model(tiny_model, tmp_path / "shipped" / "default.safetensors", version="1.0")
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: default)

    old = save_model(tiny_model, home / "models" / "old.safetensors", metrics={"dice": 0.1})
    new = save_model(tiny_model, home / "models" / "sub" / "new.safetensors", metrics={"dice": 0.3})
    (home / "models" / "last.safetensors").write_bytes(b"checkpoint without sidecar")
    _edit_card(default, created="2024-01-01T00:00:00+00:00")
    _edit_card(old, created="2024-06-01T00:00:00+00:00")
    _edit_card(new, created="2025-01-01T00:00:00+00:00")
    extra = save_model(tiny_model, tmp_path / "elsewhere" / "x.safetensors")

    entries = list_models()
    assert [e.name for e in entries] == ["new", "old", "default"]
    assert [e.is_default for e in entries] == [False, False, True]
    assert entries[0].metrics == {"dice": 0.3} and entries[2].version == "1.0"
    assert entries[0].path == new

    with_extra = list_models(extra_dirs=[tmp_path / "elsewhere", home / "models"])
    assert {e.path for e in with_extra} == {default, old, new, extra}
    assert len(with_extra) == 4


def test_dotted_model_names_keep_their_own_sidecar(tiny_model, tmp_path):
    assert checkpoint._weights_path(tmp_path / "model_v1.5") == tmp_path / "model_v1.5.safetensors"
    assert checkpoint._weights_path(tmp_path / "m.json") == tmp_path / "m.safetensors"
    assert checkpoint._weights_path(tmp_path / "m.safetensors") == tmp_path / "m.safetensors"
    assert checkpoint.sidecar_path(tmp_path / "model_v1.5.safetensors") == tmp_path / "model_v1.5.json"
    assert checkpoint.sidecar_path(tmp_path / "model_v1.5") == tmp_path / "model_v1.5.json"

    dotted = save_model(tiny_model, tmp_path / "model_v1.5", version="1.5")
    assert dotted == tmp_path / "model_v1.5.safetensors"
    assert (tmp_path / "model_v1.5.json").is_file() and not (tmp_path / "model_v1.json").exists()
    assert load_model(dotted).model_card["version"] == "1.5"

    save_model(tiny_model, tmp_path / "exp.v1", version="one")
    save_model(tiny_model, tmp_path / "exp.v2", version="two")
    assert not (tmp_path / "exp.json").exists()
    assert load_model(tmp_path / "exp.v1").model_card["version"] == "one"
    assert load_model(tmp_path / "exp.v2.json").model_card["version"] == "two"
    assert {e.name for e in list_models(extra_dirs=[tmp_path])} >= {"model_v1.5", "exp.v1", "exp.v2"}


def test_model_with_its_encoder_beside_it_can_be_saved_elsewhere(
    tiny_model, tiny_encoder_dir, tmp_path, monkeypatch
):
    """A card's relative text_encoder is relative to its model file; a re-saved copy must still load."""
    import shutil

    shutil.copytree(tiny_encoder_dir, tmp_path / "bundle" / "encoder")
    base = save_model(tiny_model, tmp_path / "bundle" / "m.safetensors")
    _edit_card(base, **{"config.text_encoder": "encoder"})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    loaded = load_model("bundle/m.safetensors")  # found beside the model
    copy = save_model(loaded, "out/copy")
    saved = json.loads((tmp_path / "out" / "copy.json").read_text())["config"]["text_encoder"]
    assert saved == str((tmp_path / "bundle" / "encoder").resolve())
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = load_model(tmp_path / copy)
    np.testing.assert_allclose(_forward(again).numpy(), _forward(loaded).numpy(), rtol=1e-5, atol=1e-6)


def test_average_models_is_the_mean_of_the_weights(tiny_config, tmp_path):
    from lsms_core.checkpoint import average_models
    from lsms_core.model import LSMS

    torch.manual_seed(0)
    a, b = LSMS(tiny_config), LSMS(tiny_config)
    with torch.no_grad():  # running statistics are averaged too
        a.decoder.heads[0].bias.fill_(1.0)
        b.decoder.heads[0].bias.fill_(3.0)
    paths = [save_model(m, tmp_path / f"{n}.safetensors") for n, m in (("a", a), ("b", b))]

    soup = average_models(paths)
    for name, value in soup.state_dict().items():
        if name.startswith("text_encoder.") or not value.is_floating_point():
            continue
        expected = (a.state_dict()[name] + b.state_dict()[name]) / 2
        torch.testing.assert_close(value, expected, msg=name)
    assert torch.all(soup.decoder.heads[0].bias == 2.0)
    assert soup.text_encoder is not None and soup.config == a.config
    round_trip = load_model(save_model(soup, tmp_path / "soup.safetensors"))
    np.testing.assert_allclose(
        _forward(round_trip).numpy(), _forward(soup.eval()).numpy(), rtol=1e-5, atol=1e-6
    )

    other = save_model(
        LSMS(dataclasses.replace(tiny_config, decoder_dim=tiny_config.decoder_dim * 2)), tmp_path / "c"
    )
    with pytest.raises(ValueError, match="differ in names or shapes"):
        average_models([paths[0], other])
    with pytest.raises(ValueError, match="at least two"):
        average_models(paths[:1])
