"""2D slice-level evaluation: report structure, determinism, the presence gate, metrics against a
hand computation with a model forced to predict everything, subsets, the JSON report, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _datasets import make_tiny_dataset

from lsms_core.evaluate import evaluate_model, evaluate_path, evenly_spaced, target_size_group


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("eval") / "tiny", cases=4)


@pytest.fixture()
def model(tiny_config):
    from lsms_core.model import LSMS

    return LSMS(dataclasses.replace(tiny_config, image_size=32))


def force_outputs(model, mask_logit: float, presence_logit: float) -> None:
    """Make the final mask head and the presence head output constants (real model, fixed weights)."""
    with torch.no_grad():
        head = model.decoder.heads[0]
        head.weight.zero_()
        head.bias.fill_(mask_logit)
        last = model.presence_head.mlp[-1]
        last.weight.zero_()
        last.bias.fill_(presence_logit)


def test_report_structure_determinism_progress_and_mode(model, data_dir):
    from lsms_core.data.dataset import SliceDataset

    calls = []
    model.train()
    report = evaluate_model(model, data_dir, "test", batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert model.training  # mode restored
    pairs = SliceDataset(data_dir, "test", image_size=32)
    assert report["items"] == report["total_items"] == len(pairs)
    assert report["split"] == "test" and report["image_size"] == 32
    json.dumps(report)
    overall = report["overall"]
    for key in ("mIoU", "oIoU", "dice", "P@0.5", "P@0.9", "negative_accuracy", "presence_accuracy"):
        assert key in overall
    assert set(report["per_kind"]) == {"attenuation", "negative"}
    assert report["per_kind"]["negative"]["n_positive"] == 0
    assert overall["n"] == len(pairs)
    # progress: increasing counts up to the total, one call per batch
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1] == (len(pairs), len(pairs))
    assert len(calls) == -(-len(pairs) // 4)
    # deterministic: same pairs, same numbers (batch size does not matter either)
    assert evaluate_model(model, data_dir, "test", batch_size=7) == report


def test_presence_gate_empties_every_prediction(model, data_dir):
    force_outputs(model, mask_logit=20.0, presence_logit=-20.0)  # mask everywhere, "absent"
    report = evaluate_model(model, data_dir, "test")
    overall = report["overall"]
    assert overall["negative_accuracy"] == 1.0
    assert overall["mIoU"] == 0.0 and overall["P@0.5"] == 0.0 and overall["oIoU"] == 0.0
    assert overall["presence_accuracy"] == pytest.approx(overall["n_negative"] / overall["n"])


def test_metrics_match_a_hand_computation(model, data_dir):
    from lsms_core.data.dataset import SliceDataset

    force_outputs(model, mask_logit=20.0, presence_logit=20.0)  # every pixel, "present"
    report = evaluate_model(model, data_dir, "val")
    pairs = SliceDataset(data_dir, "val", image_size=32)
    areas = np.array([float(pairs[i]["mask"].sum()) for i in range(len(pairs))])
    pixels = 32 * 32
    positives = areas[areas > 0]
    overall = report["overall"]
    assert overall["n_positive"] == len(positives) > 0
    assert overall["mIoU"] == pytest.approx(float(np.mean(positives / pixels)))
    assert overall["oIoU"] == pytest.approx(areas.sum() / (pixels * len(areas)))
    assert overall["negative_accuracy"] == 0.0
    assert overall["presence_accuracy"] == pytest.approx(len(positives) / len(areas))
    kinds = [pairs[i]["kind"] for i in range(len(pairs))]
    assert report["per_kind"]["negative"]["n"] == kinds.count("negative")
    # by target size: only positives, each group's mIoU is its own targets' share of the slice
    groups = [target_size_group(int(a), pixels) for a in positives]
    assert sum(g["n"] for g in report["per_target_size"].values()) == len(positives)
    for name, metrics in report["per_target_size"].items():
        mine = positives[[g == name for g in groups]]
        assert metrics["n"] == len(mine) and metrics["mIoU"] == pytest.approx(float(np.mean(mine / pixels)))


def test_slice_content_groups_split_the_positives_by_what_else_the_slice_shows(model, data_dir):
    from lsms_core.data.dataset import ReferringDataset, SliceDataset, other_lesion_on_slice

    lesions = {"1": {"slices": [3, 4, 5]}, "2": {"slices": [5, 6]}}
    assert not other_lesion_on_slice(4, [1], lesions)  # only the target
    assert other_lesion_on_slice(5, [1], lesions) and other_lesion_on_slice(6, [1], lesions)
    assert not other_lesion_on_slice(5, [1, 2], lesions)  # both are targets
    assert other_lesion_on_slice(5, [], lesions)

    force_outputs(model, mask_logit=20.0, presence_logit=20.0)  # every pixel, "present"
    report = evaluate_model(model, data_dir, "val")
    pairs = SliceDataset(data_dir, "val", image_size=32)
    info = ReferringDataset(data_dir).case_info
    expected = {"only the target(s)": [], "another lesion too": []}
    for i in range(len(pairs)):
        item, record = pairs[i], pairs.records[pairs.items[i][0]]
        area = float(item["mask"].sum())
        if area:
            crowded = any(
                int(lesion) not in record["targets"] and pairs.items[i][1] in v["slices"]
                for lesion, v in info(record["case"])["lesions"].items()
            )
            expected["another lesion too" if crowded else "only the target(s)"].append(area / (32 * 32))
    assert all(expected.values()), "the tiny dataset should have both kinds of slices"
    assert list(report["per_slice_content"]) == list(expected)
    for name, ious in expected.items():
        group = report["per_slice_content"][name]
        assert group["n"] == len(ious) and group["mIoU"] == pytest.approx(float(np.mean(ious)))


def test_a_drawn_mask_is_scored_but_in_no_slice_content_group(model, tmp_path):
    """A record with a drawn mask does not say which lesion it is: evaluation counts its pairs
    overall but cannot say whether the slice shows another lesion, and training does not repeat them."""
    from lsms_core.data.dataset import DatasetWriter, SliceDataset
    from lsms_core.io import write_volume
    from tests.test_dataset import make_case

    writer = DatasetWriter(tmp_path / "drawn", name="drawn", license="CC0-1.0")
    image, lesions, organ = make_case(3)
    writer.add_case("case_00", image, lesions, organ)
    write_volume(tmp_path / "drawn" / "cases" / "case_00" / "masks" / "m1.nii.gz",
                 (lesions == 1).astype(np.uint8), like=image)  # fmt: skip
    writer.add_expressions(
        [
            {"case": "case_00", "expression": "the one I drew", "mask": "cases/case_00/masks/m1.nii.gz"},
            {"case": "case_00", "expression": "the first lesion", "targets": [1]},
        ]
    )
    writer.write_splits({"train": [], "val": ["case_00"], "test": []})
    pairs = SliceDataset(tmp_path / "drawn", "val", image_size=32)
    drawn, listed = pairs.records
    shared = [z for i, z, _ in pairs.items if pairs.records[i] is listed and z in pairs._target_slices(drawn)]
    assert shared, "both records should cover the same lesion slices"
    assert pairs.shows_other_lesion(drawn, shared[0]) is None
    assert pairs.shows_other_lesion(listed, shared[0]) is not None
    repeated = SliceDataset(tmp_path / "drawn", "val", image_size=32, crowded_repeat=3)
    assert sum(repeated.records[i] is repeated.records[0] for i, _, _ in repeated.items) == sum(
        pairs.records[i] is drawn for i, _, _ in pairs.items
    )

    force_outputs(model, mask_logit=20.0, presence_logit=20.0)
    report = evaluate_model(model, tmp_path / "drawn", "val", per_pair=True)
    positives = [p for p in report["pairs"] if p["target_area"] > 0]
    from_list = [p for p in positives if p["id"] == listed["id"]]
    assert len(positives) > len(from_list) > 0
    assert sum(g["n"] for g in report["per_slice_content"].values()) == len(from_list)


def test_target_size_groups():
    assert target_size_group(0, 1000) is None
    assert target_size_group(1, 10_000) == "< 0.05 %"  # 0.01 %
    assert target_size_group(5, 10_000) == "0.05-0.15 %"  # the bound belongs to the next group
    assert target_size_group(100, 10_000) == "0.5-1.5 %"
    assert target_size_group(10_000, 10_000) == ">= 1.5 %"


def test_max_items_takes_an_even_deterministic_subset(model, data_dir):
    assert evenly_spaced(10, None) == list(range(10))
    assert evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert evenly_spaced(3, 8) == [0, 1, 2]
    report = evaluate_model(model, data_dir, "test", max_items=4)
    assert report["items"] == 4 and report["total_items"] > 4
    with pytest.raises(ValueError, match="max_items"):
        evenly_spaced(10, 0)


def test_per_pair_records_add_up_to_the_report(model, data_dir):
    from lsms_core.metrics import PairStats, summarize

    report = evaluate_model(model, data_dir, "test", max_items=6, per_pair=True)
    pairs = report["pairs"]
    assert len(pairs) == report["items"] == 6
    assert all(0.0 <= p["presence"] <= 1.0 and p["case"] and p["id"] for p in pairs)
    counts = ("intersection", "union", "pred_area", "target_area")
    again = summarize(PairStats(**{k: p[k] for k in counts}) for p in pairs)
    assert again["mIoU"] == report["overall"]["mIoU"] and again["oIoU"] == report["overall"]["oIoU"]
    assert "pairs" not in evaluate_model(model, data_dir, "test", max_items=6)


def test_evaluate_path_writes_the_json_report(model, data_dir, tmp_path):
    from lsms_core.checkpoint import save_model
    from lsms_core.data.dataset import ReferringDataset

    path = save_model(model, tmp_path / "m.safetensors", version="7")
    out = tmp_path / "reports" / "test.json"
    report = evaluate_path(path, data_dir, "test", json_out=out, max_items=3)
    assert json.loads(out.read_text()) == report
    assert report["model"] == str(path) and report["model_version"] == "7"
    assert report["data_fingerprint"] == ReferringDataset(data_dir).fingerprint()
    assert "pairs" not in report
    with_pairs = evaluate_path(path, data_dir, "test", max_items=3, per_pair=True)
    assert len(with_pairs["pairs"]) == 3 and with_pairs["overall"] == report["overall"]
    with pytest.raises(ValueError, match="per_pair"):
        evaluate_path(path, data_dir, "test", level="volume", per_pair=True)
    assert report["items"] == 3


def test_bad_split_or_data_raise_clear_errors(model, data_dir, tmp_path):
    with pytest.raises(ValueError, match="no split 'nope'"):
        evaluate_model(model, data_dir, "nope")
    empty = make_tiny_dataset(tmp_path / "d", cases=2, splits={"train": ["case00", "case01"], "test": []})
    with pytest.raises(ValueError, match="'test' split .* has no cases"):
        evaluate_model(model, empty, "test")
    with pytest.raises(FileNotFoundError):
        evaluate_path(tmp_path / "m.safetensors", tmp_path / "nowhere", "test")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(model, data_dir, "test", batch_size=0)


# ---------------------------------------------------------------- 3D: evaluate_volumes


def test_volume_evaluation_scores_each_expression_in_3d(model, data_dir):
    """An oracle Segmenter scores 1.0, one that answers "not found" scores 0 with every negative
    right; kinds and counts follow expressions.jsonl, and the CLI-facing path agrees."""
    from lsms_core.data.dataset import ReferringDataset
    from lsms_core.evaluate import evaluate_volumes
    from lsms_core.infer import SegmentationResult, Segmenter

    dataset = ReferringDataset(data_dir)
    records = dataset.expressions("test")
    segmenter = Segmenter(model, device="cpu")
    seen: list[str] = []

    def oracle(image, text, **kwargs):
        seen.append(text)
        record = next(
            r for r in records if r["expression"] == text and dataset.load_case(r["case"]).image is image
        )
        truth = dataset.target_mask(record, dataset.load_case(record["case"]))
        return SegmentationResult(
            mask=truth, slice_scores=np.zeros(truth.shape[0]), found=bool(truth.any()), cancelled=False, text=text
        )

    segmenter.segment = oracle
    calls = []
    report = evaluate_volumes(segmenter, dataset, "test", progress=lambda d, t: calls.append((d, t)))
    assert report["level"] == "volume" and report["items"] == len(records) == len(seen)
    assert calls[-1] == (len(records), len(records))
    positives = [r for r in records if r.get("targets")]
    assert positives and report["overall"]["mIoU"] == pytest.approx(1.0)
    assert report["overall"]["n_positive"] == len(positives)
    kinds = {r.get("kind") for r in records}
    assert set(report["per_kind"]) == kinds
    json.dumps(report)

    # make_tiny_dataset(cases=4): the test split is one case with three expressions, the dark and
    # the bright lesion (one target each) and one negative, so max_expressions=3 takes all of them.
    assert len(records) == 3 and [len(r["targets"]) for r in records] == [1, 1, 0]
    assert (report["overall"]["n_positive"], report["overall"]["n_negative"]) == (2, 1)
    assert report["overall"]["negative_accuracy"] == 1.0

    force_outputs(model, mask_logit=5.0, presence_logit=-10.0)  # the real model now finds nothing
    empty = evaluate_volumes(model, dataset, "test", max_expressions=3)
    assert empty["items"] == 3 and empty["total_items"] == len(records)
    assert (empty["overall"]["n_positive"], empty["overall"]["n_negative"]) == (2, 1)
    assert empty["overall"]["mIoU"] == 0.0
    assert empty["overall"]["negative_accuracy"] == 1.0


def test_volume_level_through_evaluate_path(model, data_dir, tmp_path):
    from lsms_core.checkpoint import save_model

    path = save_model(model, tmp_path / "m.safetensors", version="3")
    report = evaluate_path(path, data_dir, "test", level="volume", max_items=2)
    assert report["level"] == "volume" and report["items"] == 2 and report["model_version"] == "3"
    with pytest.raises(ValueError, match="level"):
        evaluate_path(path, data_dir, "test", level="cube")
