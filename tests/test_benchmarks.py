"""The benchmark scripts' own logic (their figures are measured by running them, not here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: the scripts import their helpers
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _args(**given) -> argparse.Namespace:
    flags = dict(config=None, max_steps=None, batch_size=None, lr=None, seed=None, val_max_items=None)
    return argparse.Namespace(**{**flags, **given})


def test_ablation_recipe_is_the_config_train_block_with_flags_on_top(tmp_path):
    ablations = _load("ablations")
    config = tmp_path / "recipe.json"
    config.write_text(
        json.dumps(
            {"model": {"image_size": 192}, "train": {"max_steps": 10000, "lr": 0.001, "patience": 1000}}
        )
    )

    full = ablations.recipe(_args(config=str(config)))
    assert full == {"max_steps": 10000, "lr": 0.001, "patience": 1000, "checkpoint_every_steps": 100}

    short = ablations.recipe(_args(config=str(config), max_steps=1200, seed=3))
    assert (short["max_steps"], short["seed"], short["patience"], short["lr"]) == (1200, 3, 1000, 0.001)

    # No "train" block: the short budget, without early stopping, still overridable.
    bare = ablations.recipe(_args(max_steps=50))
    assert bare["max_steps"] == 50 and bare["patience"] >= 10**6 and bare["batch_size"] == 8

    # Every recipe is a valid TrainConfig.
    from lsms_core.train import TrainConfig

    for fields in (full, short, bare):
        assert TrainConfig.from_dict(fields).max_steps == fields["max_steps"]


def test_ablation_title_names_the_budget_and_reads_old_results():
    ablations = _load("ablations")
    new = {
        "data": "d",
        "image_size": 192,
        "in_slices": 3,
        "recipe": {"max_steps": 10000, "batch_size": 8, "lr": 0.001, "seed": 0, "patience": 1000},
    }
    assert "up to 10000 steps" in ablations.title(new) and "patience 1000 validations" in ablations.title(new)
    old = {
        "data": "d",
        "image_size": 192,
        "in_slices": 3,
        "max_steps": 1200,
        "batch_size": 8,
        "lr": 0.001,
        "seed": 0,
    }
    assert "up to 1200 steps" in ablations.title(old) and "patience" not in ablations.title(old)


def test_paired_delta_is_the_mean_iou_difference_with_a_case_bootstrap():
    from lsms_core.evaluate import paired_delta

    def pair(case, z, inter, union, target=1):
        return {
            "id": f"{case}-e",
            "case": case,
            "z": z,
            "intersection": inter,
            "union": union,
            "target_area": target,
            "pred_area": union - target + inter,
        }

    base = [pair("a", 0, 1, 2), pair("a", 1, 0, 1), pair("b", 0, 1, 1), pair("b", 1, 0, 0, target=0)]
    other = [pair("a", 0, 1, 1), pair("a", 1, 1, 1), pair("b", 0, 1, 2), pair("b", 1, 0, 3, target=0)]
    d = paired_delta(base, other, boots=500)
    # positives: a0 0.5 -> 1, a1 0 -> 1, b0 1 -> 0.5; the negative b1 is left out
    assert d["delta"] == (0.5 + 1.0 - 0.5) / 3 and d["cases"] == 2
    assert d["lo"] <= d["delta"] <= d["hi"]
    # bootstrap over 2 cases: either both (1/3), only a (0.75) or only b (-0.5)
    assert d["lo"] >= -0.5 and d["hi"] <= 0.75
    assert paired_delta(base, base)["delta"] == 0.0
    # negatives: b1 empty in base (pred 0), not in other (pred 3): neg. empty falls by 1 on 1 pair
    e = paired_delta(base, other, boots=500, score="empty")
    assert e["delta"] == -1.0 and e["cases"] == 1 and e["lo"] == e["hi"] == -1.0
    with pytest.raises(ValueError, match="score"):
        paired_delta(base, other, score="dice")


def test_miou_at_the_full_models_negatives_empty_raises_the_presence_threshold():
    ablations = _load("ablations")

    def pair(presence, target, inter=0, pred=0):
        union = target + pred - inter
        return {
            "presence": presence,
            "target_area": target,
            "intersection": inter,
            "union": union,
            "pred_area": pred,
        }

    pairs = [
        pair(0.9, 4, inter=4, pred=4),  # positive, IoU 1
        pair(0.6, 4, inter=2, pred=2),  # positive, IoU 0.5
        pair(0.3, 4),  # positive vetoed at 0.5: IoU 0
        pair(0.7, 0, pred=3),  # negative answered (wrong) with presence 0.7
        pair(0.55, 0, pred=1),  # negative answered (wrong) with presence 0.55
        pair(0.2, 0),  # negative answered empty
    ]

    # at 0.5: 1/3 of the negatives empty, mIoU (1 + 0.5 + 0) / 3
    def matched(target):
        result = ablations.miou_at_negatives_empty(pairs, target)
        return {k: result[k] for k in ("threshold", "mIoU")}, result["pairs"]

    assert matched(0.3) == ({"threshold": None, "mIoU": 0.5}, pairs)
    # 2/3 empty: raise past 0.55 (the 0.6 positive stays); all empty: past 0.7 (the 0.6 one goes)
    assert matched(0.6)[0] == {"threshold": 0.55, "mIoU": 0.5}
    assert matched(1.0)[0] == {"threshold": 0.7, "mIoU": 1 / 3}
    assert [p["pred_area"] for p in matched(1.0)[1]] == [4, 0, 0, 0, 0, 0]
    # the same threshold applied pair by pair: the 0.6 positive and both wrong negatives are emptied
    raised = [ablations.vetoed(p, 0.7) for p in pairs]
    assert [p["pred_area"] for p in raised] == [4, 0, 0, 0, 0, 0]
    assert [p["intersection"] / p["union"] for p in raised[:3]] == [1.0, 0.0, 0.0]
    assert raised[0] is pairs[0] and raised[2] is pairs[2]  # kept or already empty: unchanged


def test_results_of_another_recipe_do_not_share_the_table(tmp_path):
    ablations = _load("ablations")
    run = {"data": "d", "image_size": 192, "in_slices": 3, "recipe": {"max_steps": 10000}}
    path = tmp_path / "ablations.json"
    path.write_text(json.dumps({"args": {**run, "variants": ["full"]}, "rows": [{"variant": "full"}]}))
    assert ablations.saved_rows(path, argparse.Namespace(**run)) == [{"variant": "full"}]
    shorter = {**run, "recipe": {"max_steps": 1200}}
    assert ablations.saved_rows(path, argparse.Namespace(**shorter)) == []
    assert ablations.saved_rows(tmp_path / "none.json", argparse.Namespace(**run)) == []


def test_threshold_sweep_at_one_half_matches_evaluate_model(tiny_config, tmp_path):
    import dataclasses

    from _datasets import make_tiny_dataset

    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import LSMS

    thresholds = _load("thresholds")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    model = LSMS(dataclasses.replace(tiny_config, image_size=32))
    counts = thresholds.collect(model, data, "test", mask_thresholds=(0.3, 0.5), batch_size=3)

    report = evaluate_model(model, data, "test")
    swept = counts.metrics(0.5, 0.5)
    assert report["overall"]["n"] == swept["n"] > 0
    for name in ("mIoU", "oIoU", "dice", "P@0.5", "negative_accuracy", "positive_empty"):
        assert swept[name] == report["overall"][name], name

    # A lower mask threshold never predicts less; a presence gate at 1 empties every answer.
    assert (counts.pred_area[:, 0] >= counts.pred_area[:, 1]).all()
    closed = counts.metrics(0.3, 1.0)
    assert closed["positive_empty"] == 1.0 and closed["mIoU"] == 0.0
    assert closed["negative_accuracy"] in (1.0, None)

    # at the default inference's two scales the sweep still scores what evaluate_model does
    two = thresholds.collect(model, data, "test", mask_thresholds=(0.5,), batch_size=3, scales=(1.0, 1.2))
    report = evaluate_model(model, data, "test", scales=(1.0, 1.2))
    assert two.metrics(0.5, 0.5)["mIoU"] == report["overall"]["mIoU"]
    assert two.metrics(0.5, 0.5)["negative_accuracy"] == report["overall"]["negative_accuracy"]
    assert (two.presence != counts.presence).any()  # the second scale was run and averaged in


def test_input_size_sweep_scores_each_model_at_each_size(tiny_config, tmp_path, capsys):
    import dataclasses

    from _datasets import make_tiny_dataset

    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import LSMS

    input_size = _load("input_size")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    model = LSMS(dataclasses.replace(tiny_config, image_size=32))
    rows = input_size.sweep({"m": model}, data, "test", sizes=(32, 48))

    assert [(r["model"], r["size"]) for r in rows] == [("m", 32), ("m", 48)]
    # its own size: the usual figures, with the per-pair records the paired Δ mIoU needs
    assert rows[0]["report"] == evaluate_model(model, data, "test", per_pair=True)
    assert rows[1]["report"]["image_size"] == 48 and model.config.image_size == 32
    input_size.print_table(rows)
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| m | 32 |")
    assert "| +0.000 [+0.000, +0.000] |" in table[2]  # the first row against itself


def test_layout_cost_times_each_layout_on_copies_with_the_same_logits(tiny_config):
    import dataclasses

    import torch

    from lsms_core.model import LSMS
    from lsms_core.testing import randomise_batch_norm

    model_cost = _load("model_cost")
    model = LSMS(dataclasses.replace(tiny_config, in_slices=3, refine_head=True))
    randomise_batch_norm(model)  # so that folding them is not a no-op
    before = {k: v.clone() for k, v in model.state_dict().items()}

    rows = model_cost.layout_cost(model, size=32, batch=2, repeats=1)

    assert [name for name, _, _ in rows] == ["default layout", "channels-last", "channels-last + folded BN"]
    assert all(ms > 0 for _, ms, _ in rows)
    assert rows[0][2] == 0.0 and all(diff < 1e-3 for _, _, diff in rows)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert next(model.encoder.parameters()).is_contiguous()  # the model itself keeps its layout

    steps = model_cost.train_step_cost(model, size=32, batch=2, repeats=1)
    assert [name for name, _ in steps] == ["default layout", "channels-last"]
    assert all(ms > 0 for _, ms in steps)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert model.encoder.stem[0][0].weight.grad is None  # the steps ran on copies


def test_component_rules_pick_by_sum_mean_peak_or_size():
    import numpy as np

    rule = _load("component_rule")
    candidates = np.zeros((6, 12, 12), dtype=np.uint8)
    prob = np.zeros(candidates.shape, dtype=np.float32)
    candidates[0:4, 0:6, 0:6] = 1  # large and unsure: the highest summed probability
    prob[0:4, 0:6, 0:6] = 0.6
    candidates[5, 9:11, 9:11] = 1  # small and sure
    prob[5, 9:11, 9:11] = 0.95
    large, small = np.zeros(candidates.shape, bool), np.zeros(candidates.shape, bool)
    large[0:4, 0:6, 0:6], small[5, 9:11, 9:11] = True, True

    assert np.array_equal(rule.select(candidates, prob, "sum", "the lesion"), large)
    assert np.array_equal(rule.select(candidates, prob, "mean", "the lesion"), small)
    assert np.array_equal(rule.select(candidates, prob, "peak", "the lesion"), small)
    assert np.array_equal(rule.select(candidates, prob, "size_rank", "the smallest lesion"), small)
    assert np.array_equal(rule.select(candidates, prob, "size_rank", "the largest lesion"), large)
    assert np.array_equal(rule.select(candidates, prob, "size_rank", "the hypodense lesion"), large)
    assert np.array_equal(rule.select(candidates, prob, "keep_all", "the lesion"), large | small)
    with pytest.raises(ValueError, match="unknown rule"):
        rule.select(candidates, prob, "median", "the lesion")


def test_component_rule_compare_reproduces_the_segmenter_with_sum(tiny_config, tmp_path, capsys):
    import dataclasses

    from _datasets import make_tiny_dataset

    from lsms_core.evaluate import evaluate_volumes
    from lsms_core.model import LSMS

    rule = _load("component_rule")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    model = LSMS(dataclasses.replace(tiny_config, image_size=32))
    report = rule.compare(model, data, "test")  # raises if "sum" differs from the Segmenter's masks
    assert set(report["rules"]) == set(rule.RULES)
    assert report["rules"]["sum"]["overall"] == evaluate_volumes(model, data, "test")["overall"]
    rule.print_table(report)
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(rule.RULES) and table[2].startswith("| sum |")


def test_average_models_script_writes_a_card_with_its_ingredients(tiny_config, tmp_path, capsys):
    import dataclasses

    from _datasets import make_tiny_dataset

    from lsms_core.checkpoint import load_model, read_model_card, save_model
    from lsms_core.model import LSMS

    script = _load("average_models")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    config = dataclasses.replace(tiny_config, image_size=32)
    paths = [
        str(save_model(LSMS(config), tmp_path / f"{n}.safetensors", data_fingerprint="abc")) for n in "ab"
    ]
    out = tmp_path / "soup.safetensors"
    assert script.main([*paths, "--out", str(out), "--data", str(data)]) == 0

    card = read_model_card(out)
    assert [i["file"] for i in card["extra"]["average_of"]] == paths
    assert card["data_fingerprint"] == "abc" and card["metrics"]["split"] == "val"
    assert 0.0 <= card["metrics"]["mIoU"] <= 1.0 and "per_kind" in card["extra"]
    assert all(not isinstance(v, dict) for v in card["metrics"].values())  # lsms info prints them
    load_model(out)  # a normal model file
    assert "the mean of 2 models" in capsys.readouterr().out


def test_markdown_cells_and_table(capsys):
    markdown = _load("_markdown")
    assert [markdown.cell(v) for v in (0.12345, None, 2336, "stage 4")] == ["0.123", "-", "2336", "stage 4"]
    markdown.print_markdown_table(["model", "mIoU"], [["a", markdown.cell(0.5)], ["b", markdown.cell(None)]])
    assert capsys.readouterr().out.splitlines() == [
        "| model | mIoU |",
        "|---|---|",
        "| a | 0.500 |",
        "| b | - |",
    ]


def test_combine_answers_selections_on_known_components():
    import numpy as np

    script = _load("combine_answers")
    mask = np.zeros((3, 12, 12), dtype=np.float32)
    mask[:, 0:4, 0:4] = 0.6  # large and unsure: the highest summed probability (9.6)
    mask[:, 9:11, 9:11] = 0.95  # small and sure (3.8): the lesion meant
    targets = np.zeros(mask.shape, dtype=bool)
    targets[0:2, 9:11, 9:11] = True  # pair 2 is a negative
    presence = np.array([0.9, 0.9, 0.9], dtype=np.float32)
    info = [
        {"id": "a", "case": "c1", "z": 0, "text": "the lesion"},
        {"id": "b", "case": "c1", "z": 0, "text": "all lesions"},
        {"id": "c", "case": "c2", "z": 0, "text": "the lesion"},
    ]

    def ious(selection):
        records, summary = script.score(mask, presence, targets, info, selection)
        return [r["intersection"] / r["union"] if r["target_area"] else r["pred_area"] for r in records]

    assert ious("none") == [4 / 20, 4 / 20, 20]  # both components, whatever the text
    # the Segmenter's rule: a singular expression keeps the highest summed probability, a plural all
    assert ious("postprocess") == [0.0, 4 / 20, 16]
    # the oracle keeps what touches the target and leaves negatives as answered
    assert ious("oracle") == [1.0, 1.0, 20]
    gated = script.score(mask, np.array([0.4, 0.9, 0.9], dtype=np.float32), targets, info, "none")[0]
    assert gated[0]["pred_area"] == 0  # a presence below 0.5 empties the answer


def test_combine_answers_first_rows_are_evaluate_models_figures(tiny_config, tmp_path, capsys):
    import dataclasses

    import torch
    from _datasets import make_tiny_dataset

    from lsms_core.checkpoint import load_model, save_model
    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import LSMS

    script = _load("combine_answers")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    config = dataclasses.replace(tiny_config, image_size=32)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(save_model(LSMS(config), tmp_path / f"m{seed}.safetensors")))

    model = load_model(paths[0])
    mask, presence, targets, info = script.answers(model, data, "test")
    records, summary = script.score(mask, presence, targets, info)
    report = evaluate_model(model, data, "test", per_pair=True)
    assert [(r["id"], r["z"], r["intersection"], r["union"]) for r in records] == [
        (p["id"], p["z"], p["intersection"], p["union"]) for p in report["pairs"]
    ]
    assert summary["mIoU"] == report["overall"]["mIoU"]

    assert script.main(["--data", str(data), "--split", "test", "--scales", "1", "--models", *paths]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    names = [line.split(" | ")[0][2:] for line in rows]
    assert names == [
        *paths,
        "mean of all",
        f"{paths[0]} + per-slice postprocess",
        "mean of all + per-slice postprocess",
        f"{paths[0]} + oracle component choice (upper bound)",
    ]
    assert f"| {script.cell(report['overall']['mIoU'])} |" in rows[0]


def test_learned_choice_raw_answers_are_evaluate_models_pairs(tiny_config, tmp_path):
    import dataclasses

    import torch
    from _datasets import make_tiny_dataset

    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import LSMS

    script = _load("learned_choice")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    torch.manual_seed(0)
    model = LSMS(dataclasses.replace(tiny_config, image_size=32))
    records, comps, sentence = script.components(model, data, "test", None, (1.0,))
    raw = script.choose(records, comps, lambda r, cs: range(len(cs)))
    report = evaluate_model(model, data, "test", per_pair=True)
    assert [(r["id"], r["z"], r["intersection"], r["union"]) for r in raw] == [
        (p["id"], p["z"], p["intersection"], p["union"]) for p in report["pairs"]
    ]
    assert set(sentence) == {r["text"] for r in records}


def test_learned_choice_scorer_learns_which_component_the_words_mean():
    import numpy as np

    script = _load("learned_choice")
    rng = np.random.default_rng(0)
    words = {"the larger one": np.ones(8, np.float32), "the smaller one": -np.ones(8, np.float32)}

    def answers(n):
        records, comps = [], []
        for k in range(n):
            text = ["the larger one", "the smaller one"][k % 2]
            areas = rng.choice(np.arange(20, 400), size=rng.integers(2, 4), replace=False).astype(float)
            meant = int(areas.argmax() if text == "the larger one" else areas.argmin())
            comps.append(
                [
                    {"area": a, "inter": a if j == meant else 0.0, "psum": 0.8 * a, "pmax": 0.9,
                     "image": 0.5, "ring": 0.6, "cy": rng.random(), "cx": rng.random()}
                    for j, a in enumerate(areas)
                ]
            )  # fmt: skip
            records.append(
                {"id": str(k), "case": f"c{k % 5}", "z": 0, "text": text, "singular": True,
                 "presence": 0.9, "target_area": int(areas[meant]), "embedding": words[text]}
            )  # fmt: skip
        return records, comps

    train = answers(400)
    score, n_components, n_answers = script.train_scorer(
        *train, words, epochs=30, dropout=0.0, seed=0, use_text=True
    )
    assert n_answers == 400 and n_components == sum(len(cs) for cs in train[1])
    records, comps = answers(100)

    def learned(r, cs):
        return [int(score(cs, r["presence"], r["embedding"]).argmax())]

    chosen = script.choose(records, comps, learned)
    assert np.mean([p["intersection"] == p["union"] for p in chosen]) > 0.95
    # without the words the same scorer cannot tell "larger" from "smaller": about half right
    blind, *_ = script.train_scorer(*train, words, epochs=30, dropout=0.0, seed=0, use_text=False)
    chosen = script.choose(
        records, comps, lambda r, cs: [int(blind(cs, r["presence"], r["embedding"]).argmax())]
    )
    assert np.mean([p["intersection"] == p["union"] for p in chosen]) < 0.7


def test_where_it_fails_groups_every_positive_pair_once(tiny_config, tmp_path):
    import dataclasses

    import numpy as np
    import torch
    from _datasets import make_tiny_dataset

    from lsms_core.data.dataset import ReferringDataset, SliceDataset
    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import LSMS

    script = _load("where_it_fails")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    torch.manual_seed(0)
    model = LSMS(dataclasses.replace(tiny_config, image_size=32))
    report = evaluate_model(model, data, "test", per_pair=True)
    rows = script.pair_groups(report, data, "test")

    positives = [p for p in report["pairs"] if p["target_area"]]
    assert len(rows) == len(positives) > 0
    assert np.mean([r["iou"] for r in rows]) == pytest.approx(report["overall"]["mIoU"])
    # the tiny lesions are cylinders: every slice holds their whole cross-section
    assert {r["band"] for r in rows} == {"core (>= 60 %)"}
    # "another lesion too" agrees with the dataset's own test; the tiny records carry no query
    slices = SliceDataset(ReferringDataset(data), "test", image_size=32)
    records = {r["id"]: r for r in ReferringDataset(data).expressions("test")}
    expected = [script.CONTENT[slices.shows_other_lesion(records[p["id"]], p["z"])] for p in positives]
    assert [r["content"] for r in rows] == expected and len(set(expected)) == 2
    assert all(r["words"] == ["(no query)"] for r in rows)

    first, second, third = script.tables(rows)
    assert first[-1][-1] == f"{np.mean([r['iou'] for r in rows]):.3f} ({len(rows)})"
    assert second[0][0] == "(no query)"
    assert all(r["decided_by"] == "(no query)" for r in rows)
    assert third[-1] == ["(no query)", *(first[i][-1] for i in range(2))]
    assert script.share_band(0.1) == "tip or edge (< 25 %)" and script.share_band(0.6) == "core (>= 60 %)"


def test_where_it_fails_prints_its_tables_for_evenly_spaced_pairs(tiny_config, tmp_path, capsys):
    import dataclasses

    from _datasets import make_tiny_dataset

    from lsms_core.checkpoint import save_model
    from lsms_core.model import LSMS

    script = _load("where_it_fails")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4)
    path = save_model(LSMS(dataclasses.replace(tiny_config, image_size=32)), tmp_path / "m.safetensors")
    args = ["--data", str(data), "--split", "test", "--model", str(path), "--scales", "1", "--max-items", "4"]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    positives = int(out.split(": ", 1)[1].split(" positive pairs")[0])
    assert 0 < positives <= 4  # of the 4 pairs scored, the negatives are not grouped
    assert "| the slice shows |" in out and "| words of the query |" in out
    assert "| on the slice, what decides |" in out


def test_word_swap_scores_an_answer_that_follows_the_words_and_one_that_does_not():
    import numpy as np

    script = _load("word_swap")
    lesion_a, lesion_b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    lesion_a[1:3, 1:3], lesion_b[5:7, 5:7] = True, True
    both = lesion_a | lesion_b
    ignored = script.pair_scores(both, both, lesion_a, lesion_b)  # the same answer to both expressions
    assert ignored == {"agreement": 1.0, "own": [0.5, 0.5], "other": [1.0, 1.0]}
    followed = script.pair_scores(lesion_a, lesion_b, lesion_a, lesion_b)
    assert followed == {"agreement": 0.0, "own": [1.0, 1.0], "other": [0.0, 0.0]}
    row = script.summary_row("x", [ignored, followed])
    assert row == ["x", "2", "0.500 / 0.500", "0.500", "0.750"]
    # a slice where one lesion vanished at the model's input is left out, not scored
    gone = np.zeros((8, 8), bool)
    kept, scores = script.score_pairs(
        ["p", "q"], [both, both, lesion_a, lesion_b], [lesion_a, lesion_b, lesion_a, gone]
    )
    assert kept == ["p"] and scores == [ignored]


def test_word_swap_pairs_every_slice_that_shows_both_lesions_and_prints(tiny_config, tmp_path, capsys):
    import dataclasses

    from _datasets import make_tiny_dataset

    from lsms_core.checkpoint import save_model
    from lsms_core.data.dataset import ReferringDataset, SliceDataset
    from lsms_core.model import LSMS

    script = _load("word_swap")
    data = make_tiny_dataset(tmp_path / "tiny", cases=4, lesion_types=True)
    dataset = ReferringDataset(data)
    slices = SliceDataset(dataset, "train", image_size=32)
    pairs = script.two_lesion_pairs(slices)
    assert {script.type_pair(slices, i, j) for i, j in pairs} == {"cyst / hypervascular"}
    expected = 0
    for case in dataset.split("train"):
        shown = dataset.case_info(case)["lesions"]
        expected += len(set(shown["1"]["slices"]) & set(shown["2"]["slices"]))
    assert len(pairs) == expected > 0
    for i, j in pairs:
        (ri, zi, _), (rj, zj, _) = slices.items[i], slices.items[j]
        a, b = slices.records[ri], slices.records[rj]
        assert zi == zj and a["case"] == b["case"] and (a["targets"], b["targets"]) == ([1], [2])

    path = save_model(LSMS(dataclasses.replace(tiny_config, image_size=32)), tmp_path / "m.safetensors")
    assert script.main(["--data", str(data), "--split", "train", "--model", str(path), "--scales", "1"]) == 0
    out = capsys.readouterr().out
    assert f": {expected} slices" in out and "| IoU of the two answers (mean / median) |" in out
    assert f"| cyst / hypervascular | {expected} |" in out
