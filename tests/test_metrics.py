"""Metrics against hand-computed cases, and the documented treatment of negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lsms_core.metrics import MetricAccumulator, dice, iou, pair_stats, segmentation_metrics, to_binary


def _mask(shape=(4, 4), ones=()):
    m = np.zeros(shape, dtype=np.uint8)
    for idx in ones:
        m[idx] = 1
    return m


# prediction and target of 4 and 6 pixels sharing 3: I = 3, U = 7
PRED = _mask(ones=[(0, 0), (0, 1), (0, 2), (3, 3)])
TARGET = _mask(ones=[(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])


def test_pair_iou_and_dice_by_hand():
    s = pair_stats(PRED, TARGET)
    assert (s.intersection, s.union, s.pred_area, s.target_area) == (3, 7, 4, 6)
    assert iou(PRED, TARGET) == pytest.approx(3 / 7)
    assert dice(PRED, TARGET) == pytest.approx(6 / 10)
    assert iou(TARGET, TARGET) == 1.0 and iou(np.zeros_like(TARGET), TARGET) == 0.0


def test_negatives_have_no_iou():
    empty = np.zeros((4, 4), bool)
    assert iou(empty, empty) is None and dice(PRED, empty) is None


def test_accepts_torch_bool_and_probabilities():
    assert iou(torch.from_numpy(PRED), torch.from_numpy(TARGET).bool()) == pytest.approx(3 / 7)
    probs = PRED.astype(np.float32) * 0.9 + 0.05  # 0.95 / 0.05
    assert iou(probs, TARGET) == pytest.approx(3 / 7)
    assert to_binary(np.array([0.4, 0.6])).tolist() == [False, True]


def test_accumulator_by_hand():
    empty = np.zeros((4, 4), np.uint8)
    full = np.ones((4, 4), np.uint8)
    acc = MetricAccumulator()
    acc.update(PRED, TARGET, kind="location")  # IoU 3/7, Dice 0.6
    acc.update(TARGET, TARGET, kind="size")  # IoU 1, Dice 1
    acc.update(empty, empty, kind="negative")  # negative, correct
    acc.update(full, empty, kind="negative")  # negative, 16 false-positive pixels
    r = acc.compute()
    assert (r["n"], r["n_positive"], r["n_negative"]) == (4, 2, 2)
    assert r["mIoU"] == pytest.approx((3 / 7 + 1) / 2)
    assert r["dice"] == pytest.approx((0.6 + 1) / 2)
    assert r["oIoU"] == pytest.approx((3 + 6) / (7 + 6 + 0 + 16))
    assert r["P@0.5"] == 0.5 and r["P@0.9"] == 0.5
    assert r["negative_accuracy"] == 0.5
    assert r["positive_missed"] == 0.0 and r["positive_empty"] == 0.0
    assert set(r["per_kind"]) == {"location", "size", "negative"}
    assert r["per_kind"]["location"]["mIoU"] == pytest.approx(3 / 7)
    assert r["per_kind"]["location"]["negative_accuracy"] is None
    assert r["per_kind"]["negative"]["mIoU"] is None and r["per_kind"]["negative"]["negative_accuracy"] == 0.5
    # a second grouping of the same samples; None leaves a sample out
    by = acc.compute_by(["small", "large", None, "small"])
    assert set(by) == {"small", "large"}
    assert by["small"]["n"] == 2 and by["small"]["mIoU"] == pytest.approx(3 / 7)
    assert by["small"]["negative_accuracy"] == 0.0 and by["large"]["mIoU"] == 1.0
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        acc.compute_by(["a", "b", "c"])


def test_missed_positives_are_told_apart_from_empty_answers():
    target = np.zeros((4, 4), bool)
    target[:2, :2] = True
    elsewhere = np.zeros((4, 4), bool)
    elsewhere[3, 3] = True  # on something else: missed, not empty
    acc = MetricAccumulator()
    for pred in (target, np.zeros((4, 4), bool), elsewhere, PRED):
        acc.update(pred, target)
    acc.update(elsewhere, np.zeros((4, 4), bool))  # a negative counts in neither
    r = acc.compute()
    assert r["n_positive"] == 4
    assert r["positive_missed"] == 0.5 and r["positive_empty"] == 0.25
    assert acc.compute_by([None, None, None, None, "neg"])["neg"]["positive_missed"] is None


def test_precision_thresholds_are_inclusive():
    target = _mask((1, 10), ones=[(0, i) for i in range(10)])
    pred = _mask((1, 10), ones=[(0, i) for i in range(7)])  # IoU exactly 0.7
    r = segmentation_metrics([pred], [target])
    assert r["P@0.7"] == 1.0 and r["P@0.8"] == 0.0


def test_update_batch_matches_single_updates_and_handles_model_batches():
    rng = np.random.default_rng(0)
    preds = rng.random((5, 1, 8, 8)) > 0.5
    targets = rng.random((5, 1, 8, 8)) > 0.6
    targets[2] = False
    one_by_one = MetricAccumulator()
    for p, t in zip(preds, targets):
        one_by_one.update(p, t)
    batched = MetricAccumulator()
    batched.update_batch(torch.from_numpy(preds), torch.from_numpy(targets))
    assert batched.compute() == one_by_one.compute()
    assert len(batched) == 5 and batched.compute()["n_negative"] == 1
    batched.reset()
    assert len(batched) == 0 and batched.compute()["mIoU"] is None


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shape"):
        iou(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        iou(np.full((2, 2), np.nan), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="pair up"):
        MetricAccumulator().update_batch(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
