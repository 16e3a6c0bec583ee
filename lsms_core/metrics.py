"""Referring-segmentation metrics (NumPy; torch tensors are accepted and converted).

A *sample* is one (prediction, target) pair: a 2D slice or a whole 3D volume. Masks are bool or
{0, 1} integer arrays; float arrays are read as probabilities and thresholded at 0.5.

Definitions (``I`` = |pred ∩ target|, ``U`` = |pred ∪ target|):

* **positive** sample: the target is non-empty. Per-sample ``IoU = I / U`` and
  ``Dice = 2I / (|pred| + |target|)``. ``mIoU`` and ``dice`` are means over positives;
  ``P@X`` is the fraction of positives with ``IoU >= X`` for X in 0.5, 0.6, 0.7, 0.8, 0.9.
* **negative** sample: the target is empty (the described lesion is not there). Negatives are
  excluded from mIoU, Dice and P@X, whatever was predicted; ``negative_accuracy`` is the fraction
  of negatives whose prediction is empty.
* ``oIoU`` (overall IoU) = Σ I / Σ U over **all** samples, so false-positive area predicted on
  negatives counts against it.
* Where the positives fail: ``positive_missed`` is the fraction of positives whose prediction does
  not touch the target (``I = 0``: IoU 0), ``positive_empty`` the part of them answered with an empty
  mask ("not there" said of a lesion that is there). The rest of the missed ones went elsewhere,
  e.g. onto another lesion.

A metric with no sample to average over (e.g. ``negative_accuracy`` without negatives) is ``None``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "IOU_THRESHOLDS",
    "to_binary",
    "pair_stats",
    "iou",
    "dice",
    "summarize",
    "segmentation_metrics",
    "MetricAccumulator",
]

IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def to_binary(mask, name: str = "mask") -> np.ndarray:
    """Convert a NumPy array or torch tensor to a bool array (floats thresholded at 0.5)."""
    if hasattr(mask, "detach"):  # torch.Tensor, without importing torch
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values; pass a binary mask or probabilities")
        return arr > 0.5
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    raise ValueError(f"{name} must be a bool, integer or float array, got dtype {arr.dtype}")


@dataclass(frozen=True)
class PairStats:
    """Pixel counts of one (prediction, target) pair."""

    intersection: int
    union: int
    pred_area: int
    target_area: int

    @property
    def positive(self) -> bool:
        return self.target_area > 0

    @property
    def iou(self) -> float | None:
        return self.intersection / self.union if self.positive else None

    @property
    def dice(self) -> float | None:
        return 2 * self.intersection / (self.pred_area + self.target_area) if self.positive else None


def pair_stats(pred, target) -> PairStats:
    """Counts for one sample; ``pred`` and ``target`` must have the same shape."""
    p, t = to_binary(pred, "pred_mask"), to_binary(target, "target_mask")
    if p.shape != t.shape:
        raise ValueError(
            f"pred_mask shape {p.shape} differs from target_mask shape {t.shape}; resample one onto the other"
        )
    return PairStats(
        intersection=int(np.count_nonzero(p & t)),
        union=int(np.count_nonzero(p | t)),
        pred_area=int(np.count_nonzero(p)),
        target_area=int(np.count_nonzero(t)),
    )


def iou(pred, target) -> float | None:
    """IoU of one sample; ``None`` for a negative (empty target)."""
    return pair_stats(pred, target).iou


def dice(pred, target) -> float | None:
    """Dice of one sample; ``None`` for a negative (empty target)."""
    return pair_stats(pred, target).dice


def summarize(stats: Iterable[PairStats]) -> dict:
    """Metrics over a set of samples (see the module docstring)."""
    stats = list(stats)
    positives = [s for s in stats if s.positive]
    negatives = [s for s in stats if not s.positive]
    ious = np.array([s.iou for s in positives], dtype=np.float64)
    union = sum(s.union for s in stats)
    result: dict = {
        "n": len(stats),
        "n_positive": len(positives),
        "n_negative": len(negatives),
        "mIoU": float(ious.mean()) if positives else None,
        "oIoU": sum(s.intersection for s in stats) / union if union else None,
        "dice": float(np.mean([s.dice for s in positives])) if positives else None,
    }
    for threshold in IOU_THRESHOLDS:
        result[f"P@{threshold:.1f}"] = float((ious >= threshold).mean()) if positives else None
    result["negative_accuracy"] = (
        sum(s.pred_area == 0 for s in negatives) / len(negatives) if negatives else None
    )
    result["positive_missed"] = (
        sum(s.intersection == 0 for s in positives) / len(positives) if positives else None
    )
    result["positive_empty"] = sum(s.pred_area == 0 for s in positives) / len(positives) if positives else None
    return result


def segmentation_metrics(preds, targets) -> dict:
    """Metrics of paired sequences of masks (or arrays whose first axis indexes the samples)."""
    accumulator = MetricAccumulator()
    accumulator.update_batch(preds, targets)
    return accumulator.compute()


@dataclass
class MetricAccumulator:
    """Collect samples one by one (``update``) or by batch (``update_batch``), then ``compute``.

    Each sample may carry a ``kind`` (e.g. the expression type "location", "size", "negative");
    ``compute()`` returns the overall metrics plus ``"per_kind": {kind: metrics}``.

    Example::

        acc = MetricAccumulator()
        acc.update(pred, target, kind="location")
        acc.compute()["mIoU"]
    """

    _stats: list[PairStats] = field(default_factory=list)
    _kinds: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._stats)

    @property
    def samples(self) -> tuple[PairStats, ...]:
        """The collected samples' counts, in the order they were added."""
        return tuple(self._stats)

    def reset(self) -> None:
        self._stats.clear()
        self._kinds.clear()

    def update(self, pred_mask, target_mask, kind: str | None = None) -> PairStats:
        """Add ONE sample (a 2D slice or a 3D volume); returns its counts."""
        stats = pair_stats(pred_mask, target_mask)
        self._stats.append(stats)
        self._kinds.append(kind)
        return stats

    def update_batch(self, pred_masks, target_masks, kinds: Iterable[str | None] | None = None) -> None:
        """Add one sample per entry along the first axis (e.g. ``(B, 1, H, W)`` model batches)."""
        preds = (
            to_binary(pred_masks, "pred_masks") if not isinstance(pred_masks, (list, tuple)) else pred_masks
        )
        targets = (
            to_binary(target_masks, "target_masks")
            if not isinstance(target_masks, (list, tuple))
            else target_masks
        )
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets; they must pair up")
        kinds = [None] * len(preds) if kinds is None else list(kinds)
        if len(kinds) != len(preds):
            raise ValueError(f"got {len(kinds)} kinds for {len(preds)} samples")
        for pred, target, kind in zip(preds, targets, kinds):
            self.update(pred, target, kind)

    def compute(self) -> dict:
        """Overall metrics and ``"per_kind"`` metrics (kinds that were given, sorted by name)."""
        result = summarize(self._stats)
        result["per_kind"] = self.compute_by(self._kinds)
        return result

    def compute_by(self, labels: Iterable[str | None]) -> dict:
        """Metrics per label, sorted by name: ``labels`` gives one label per collected sample, in
        the order they were added (None leaves a sample out), e.g. a grouping beside ``kind``."""
        labels = list(labels)
        if len(labels) != len(self._stats):
            raise ValueError(f"got {len(labels)} labels for {len(self._stats)} samples")
        names = sorted({label for label in labels if label is not None})
        return {
            name: summarize(s for s, label in zip(self._stats, labels) if label == name) for name in names
        }
