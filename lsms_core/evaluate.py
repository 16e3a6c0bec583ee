"""2D slice-level evaluation of an LSMS model on a dataset split, as the paper reports it.

The evaluation set is the deterministic list of (expression, slice) pairs that
:class:`~lsms_core.data.dataset.SliceDataset` builds for the split without augmentation: the slices
where each expression's target lesions appear, some slices of the same case where they do not
(presence negatives) and organ slices for negative expressions (``targets: []``). Each pair is
scored at the model's input resolution (``image_size``): the prediction is
``sigmoid(logits) > 0.5``, emptied when the presence head says the lesion is absent
(``sigmoid(presence_logits) <= 0.5``), and fed to :class:`~lsms_core.metrics.MetricAccumulator`
with the expression's ``kind`` (location, size, attenuation, count, rank, combined, negative...).

Results are plain JSON: ``overall`` and ``per_kind`` metric dicts (mIoU, oIoU, Dice, P@0.5..0.9,
negative accuracy, as defined in :mod:`lsms_core.metrics`), plus ``presence_accuracy``.

:func:`evaluate_volumes` scores what a user of ``lsms predict`` or the napari widget gets instead:
:class:`~lsms_core.infer.Segmenter` runs over each whole case volume once per expression (body
slices, 3D post-processing, "not found") and every (expression, case) pair is one 3D sample of the
same metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsms_core.infer import DEFAULT_SCALES, THRESHOLD

if TYPE_CHECKING:  # pragma: no cover
    from lsms_core.data.dataset import ReferringDataset
    from lsms_core.model import LSMS

#: Target-size groups of the 2D report (``per_target_size``): upper bound of the target's share of
#: the slice's area, and the group's name. At 192 x 192 the bounds are about 18, 55, 184 and 553
#: pixels; lesion tips (the first and last slices a lesion shows in) fall in the smallest group.
TARGET_SIZE_GROUPS = (
    (0.0005, "< 0.05 %"),
    (0.0015, "0.05-0.15 %"),
    (0.005, "0.15-0.5 %"),
    (0.015, "0.5-1.5 %"),
    (float("inf"), ">= 1.5 %"),
)


def target_size_group(target_pixels: int, slice_pixels: int) -> str | None:
    """The :data:`TARGET_SIZE_GROUPS` name of a target of ``target_pixels`` (None when empty)."""
    if target_pixels <= 0:
        return None
    share = target_pixels / slice_pixels
    return next(name for bound, name in TARGET_SIZE_GROUPS if share < bound)


#: Slice-content groups of the 2D report (``per_slice_content``) for pairs with a non-empty target:
#: only then must the words pick the lesion, when the slice also shows one they do not refer to.
SLICE_CONTENT_GROUPS = ("only the target(s)", "another lesion too")


def evenly_spaced(n: int, max_items: int | None) -> list[int]:
    """``max_items`` indices spread evenly over ``range(n)`` (all of them when ``max_items`` is None)."""
    if max_items is None or max_items >= n:
        return list(range(n))
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
    return sorted({(i * n) // max_items for i in range(max_items)})


def _open_split(dataset, split: str) -> ReferringDataset:
    """``dataset`` as a :class:`~lsms_core.data.dataset.ReferringDataset`; a clear error when
    ``split`` is unknown (raised by ``split()``) or has no cases."""
    from lsms_core.data.dataset import ReferringDataset

    if not isinstance(dataset, ReferringDataset):
        dataset = ReferringDataset(dataset)
    if not dataset.split(split):
        raise ValueError(f"the {split!r} split of {dataset.root} has no cases; nothing to evaluate")
    return dataset


def evaluation_pairs(
    config,
    dataset: ReferringDataset | str | os.PathLike,
    split: str = "test",
    *,
    image_size: int | None = None,
    max_items: int | None = None,
):
    """The (expression, slice) pairs :func:`evaluate_model` scores, for a model of ``config``.

    Returns ``(pairs, total)``: a ``torch.utils.data.Subset`` of the split's un-augmented
    :class:`~lsms_core.data.dataset.SliceDataset` (every pair, or ``max_items`` evenly spaced ones)
    and the split's number of pairs. Raises a clear ``ValueError`` when the split has none.
    """
    from torch.utils.data import Subset

    from lsms_core.data.dataset import SliceDataset

    dataset = _open_split(dataset, split)
    pairs = SliceDataset(
        dataset,
        split,
        in_slices=config.in_slices,
        image_size=int(image_size or config.image_size),
        hu_window=tuple(config.hu_window),
        augment=False,
        seed=0,
    )
    indices = evenly_spaced(len(pairs), max_items)
    if not indices:
        raise ValueError(
            f"the {split!r} split of {dataset.root} yields no (expression, slice) pairs to evaluate"
        )
    return Subset(pairs, indices), len(pairs)


def predict_pairs(
    model: LSMS,
    pairs,
    *,
    device="cpu",
    batch_size: int = 16,
    scales: tuple[float, ...] = (1.0,),
    gate: float | None = None,
):
    """Yield ``(batch, mask_prob, presence_prob)`` for the pairs of :func:`evaluation_pairs`, in order.

    The model runs as :func:`evaluate_model` scores it: moved to ``device``, batch norms folded
    (:meth:`~lsms_core.model.LSMS.fused_for_inference`), the device's preferred memory layout,
    :meth:`~lsms_core.model.LSMS.predict` at ``scales`` / ``gate`` (``None``: its default), no
    gradients. ``mask_prob`` is ``(B, 1, H, W)`` and ``presence_prob`` ``(B,)``, on ``device``. The
    model's train/eval mode is restored when the generator finishes or is closed.
    """
    import torch
    from torch.utils.data import DataLoader

    from lsms_core.model import check_gate, preferred_memory_format

    gate = check_gate(gate)
    device = torch.device(device)
    was_training = model.training  # restored after: the runner shares (and evals) the text encoder
    model.to(device)
    memory_format = preferred_memory_format(device)
    runner = model.fused_for_inference().to(memory_format=memory_format)  # eval mode; same masks, faster
    try:
        with torch.inference_mode():
            for batch in DataLoader(pairs, batch_size=batch_size, shuffle=False):
                images = batch["image"].to(device, memory_format=memory_format)
                yield (batch, *runner.predict(images, list(batch["text"]), scales, gate))
    finally:
        model.train(was_training)


def evaluate_model(
    model: LSMS,
    dataset: ReferringDataset | str | os.PathLike,
    split: str = "test",
    *,
    device="cpu",
    batch_size: int = 16,
    image_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_items: int | None = None,
    per_pair: bool = False,
    scales: tuple[float, ...] = (1.0,),
    gate: float | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on the (expression, slice) pairs of ``split``.

    Args:
        model: an :class:`~lsms_core.model.LSMS`; it is put in eval mode and restored afterwards.
        dataset: a :class:`~lsms_core.data.dataset.ReferringDataset` or its folder.
        split: split name (``"all"`` for every case).
        device: torch device for the forward passes (the model is moved there).
        batch_size: pairs per forward pass.
        image_size: model input side; ``None`` = ``model.config.image_size``.
        progress: called as ``progress(done, total)`` after each batch.
        max_items: evaluate an evenly spaced deterministic subset of at most this many pairs.
        per_pair: also return ``"pairs"``: one record per pair, in evaluation order, with ``id``
            (expression), ``case``, ``z``, ``kind``, the pixel counts ``intersection``, ``union``,
            ``pred_area``, ``target_area`` and ``presence`` (the presence head's probability), e.g.
            to compare two models pair by pair or case by case.
        scales: input scales whose probabilities are averaged (:meth:`~lsms_core.model.LSMS.predict`);
            ``(1.0,)`` is a single forward pass.
        gate: :meth:`~lsms_core.model.LSMS.predict`'s ``gate`` for the extra scales (``None``: its
            default, :data:`~lsms_core.model.SCALES_GATE`; 0 averages every pair over every scale).

    Returns:
        ``{"split", "items", "total_items", "image_size", "threshold", "overall": {...},
        "per_kind": {kind: {...}}, "per_target_size": {group: {...}}, "per_slice_content":
        {group: {...}}}`` (JSON-serialisable; ``per_target_size`` groups the pairs with a non-empty
        target by :data:`TARGET_SIZE_GROUPS`, ``per_slice_content`` by
        :data:`SLICE_CONTENT_GROUPS`: whether the slice also shows a lesion the expression does
        not refer to).
    """
    import numpy as np

    from lsms_core.metrics import MetricAccumulator
    from lsms_core.model import check_gate, check_scales

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scales = check_scales(scales)
    gate = check_gate(gate)
    size = int(image_size or model.config.image_size)
    pairs, total = evaluation_pairs(model.config, dataset, split, image_size=size, max_items=max_items)
    indices = pairs.indices
    accumulator = MetricAccumulator()
    sizes: list[str | None] = []  # target_size_group of each pair, in the accumulator's order
    contents: list[str | None] = []  # its SLICE_CONTENT_GROUPS name (None: negative pair or drawn mask)
    slice_pairs = pairs.dataset  # the SliceDataset: its records and their cases' lesion slices
    record_of = {record["id"]: record for record in slice_pairs.records}
    records: list[dict] = []  # per_pair: what identifies each pair, in the accumulator's order
    presence_hits = done = 0
    # closing(): the model's mode is restored at once, even when scoring a batch raises
    answers = predict_pairs(model, pairs, device=device, batch_size=batch_size, scales=scales, gate=gate)
    with contextlib.closing(answers):
        for batch, mask_prob, presence_prob in answers:
            present = presence_prob > THRESHOLD
            pred = (mask_prob > THRESHOLD) & present[:, None, None, None]
            target = batch["mask"].to(mask_prob.device) > 0.5
            presence_hits += int((present == target.flatten(1).any(1)).sum())
            kinds = [kind or None for kind in batch["kind"]]
            pred_np, target_np = pred[:, 0].cpu().numpy(), target[:, 0].cpu().numpy()
            accumulator.update_batch(pred_np, target_np, kinds)
            slice_pixels = target_np.shape[1] * target_np.shape[2]
            sizes += [target_size_group(int(t.sum()), slice_pixels) for t in target_np]
            for i, z, t in zip(batch["id"], batch["z"], target_np):
                # no group for a negative pair, nor for a drawn mask (its lesion is not recorded)
                other = slice_pairs.shows_other_lesion(record_of[i], int(z)) if t.any() else None
                contents.append(None if other is None else SLICE_CONTENT_GROUPS[int(other)])
            if per_pair:
                probs = presence_prob.cpu().tolist()
                records += [
                    {"id": i, "case": c, "z": int(z), "kind": k, "presence": round(p, 4)}
                    for i, c, z, k, p in zip(batch["id"], batch["case"], batch["z"], batch["kind"], probs)
                ]
            done += len(kinds)
            if progress is not None:
                progress(done, len(indices))

    computed = accumulator.compute()
    per_kind = computed.pop("per_kind", {})
    size_metrics = accumulator.compute_by(sizes)
    per_target_size = {name: size_metrics[name] for _, name in TARGET_SIZE_GROUPS if name in size_metrics}
    content_metrics = accumulator.compute_by(contents)
    per_slice_content = {
        name: content_metrics[name] for name in SLICE_CONTENT_GROUPS if name in content_metrics
    }
    overall = {**computed, "presence_accuracy": presence_hits / len(indices)}
    result = {
        "split": split,
        "items": len(indices),
        "total_items": total,
        "image_size": size,
        "threshold": THRESHOLD,
        "scales": list(scales),
        "gate": gate if len(scales) > 1 else None,
        "overall": overall,
        "per_kind": per_kind,
        "per_target_size": per_target_size,
        "per_slice_content": per_slice_content,
    }
    if per_pair:
        result["pairs"] = [
            {**record, **dataclasses.asdict(stats)} for record, stats in zip(records, accumulator.samples)
        ]
    return _to_builtin(result, np)


def paired_delta(
    base: list[dict], other: list[dict], boots: int = 2000, seed: int = 0, *, score: str = "iou"
) -> dict:
    """score(other) - score(base) over the pairs both scored, with a 95 % interval from a
    bootstrap over the split's *cases* (pairs of one case are not independent).

    ``score="iou"``: the mean IoU of the positive pairs (mIoU); ``score="empty"``: the share of
    negative pairs answered with an empty mask ("neg. empty").
    """
    import numpy as np

    def scores(pairs):
        if score == "iou":
            return {
                (p["id"], p["z"]): (p["case"], p["intersection"] / p["union"])
                for p in pairs
                if p["target_area"]
            }
        if score == "empty":
            return {
                (p["id"], p["z"]): (p["case"], float(p["pred_area"] == 0))
                for p in pairs
                if not p["target_area"]
            }
        raise ValueError(f"score must be 'iou' or 'empty', got {score!r}")

    a, b = scores(base), scores(other)
    keys = sorted(a.keys() & b.keys())
    cases = sorted({a[k][0] for k in keys})
    index = {c: i for i, c in enumerate(cases)}
    sums, counts = np.zeros(len(cases)), np.zeros(len(cases))
    for k in keys:
        sums[index[a[k][0]]] += b[k][1] - a[k][1]
        counts[index[a[k][0]]] += 1
    draws = np.random.default_rng(seed).integers(0, len(cases), size=(boots, len(cases)))
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"delta": float(sums.sum() / counts.sum()), "lo": float(lo), "hi": float(hi), "cases": len(cases)}


def evaluate_volumes(
    model,
    dataset: ReferringDataset | str | os.PathLike,
    split: str = "test",
    *,
    device="cpu",
    batch_size: int = 8,
    max_expressions: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    scales: tuple[float, ...] = DEFAULT_SCALES,
) -> dict[str, Any]:
    """Evaluate ``model`` in 3D: one :meth:`Segmenter.segment <lsms_core.infer.Segmenter.segment>`
    per expression of ``split`` over its whole case, scored against the 3D target.

    Args:
        model: an :class:`~lsms_core.model.LSMS`, a model file, or a ready
            :class:`~lsms_core.infer.Segmenter`.
        dataset: a :class:`~lsms_core.data.dataset.ReferringDataset` or its folder.
        max_expressions: an evenly spaced deterministic subset of at most this many expressions.
        progress: called as ``progress(done, total)`` after each expression.
        scales: input scales averaged per slice (the Segmenter's ``scales``, by default
            :data:`~lsms_core.infer.DEFAULT_SCALES`; ignored for a ready Segmenter, which keeps its own).

    Returns:
        ``{"split", "level": "volume", "items", "total_items", "threshold", "overall": {...},
        "per_kind": {...}}``: mIoU, Dice and P@X over positive expressions (3D IoU per expression),
        ``negative_accuracy`` = share of negative expressions answered with an empty volume.
    """
    import numpy as np

    from lsms_core.infer import Segmenter
    from lsms_core.metrics import MetricAccumulator

    dataset = _open_split(dataset, split)
    segmenter = (
        model
        if isinstance(model, Segmenter)
        else Segmenter(model, device=device, batch_size=batch_size, scales=scales)
    )
    every = dataset.expressions(split)
    records = [every[i] for i in evenly_spaced(len(every), max_expressions)]
    if not records:
        raise ValueError(f"the {split!r} split of {dataset.root} has no expressions to evaluate")
    records.sort(key=lambda r: r["case"])  # one case in memory at a time
    accumulator = MetricAccumulator()
    for done, record in enumerate(records, 1):
        case = dataset.load_case(record["case"])
        result = segmenter.segment(case.image, record["expression"])
        accumulator.update(result.mask > 0, dataset.target_mask(record, case) > 0, record.get("kind") or None)
        if progress is not None:
            progress(done, len(records))
    computed = accumulator.compute()
    per_kind = computed.pop("per_kind", {})
    result = {
        "split": split,
        "level": "volume",
        "items": len(records),
        "total_items": len(every),
        "threshold": THRESHOLD,
        "scales": list(segmenter.scales),
        "overall": computed,
        "per_kind": per_kind,
    }
    return _to_builtin(result, np)


def _to_builtin(value, np):
    """numpy scalars/arrays -> Python values, recursively (for ``json.dumps``)."""
    if isinstance(value, dict):
        return {str(k): _to_builtin(v, np) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v, np) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def evaluate_path(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    split: str = "test",
    json_out: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    batch_size: int = 16,
    max_items: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    level: str = "slice",
    per_pair: bool = False,
    scales: tuple[float, ...] = DEFAULT_SCALES,
) -> dict[str, Any]:
    """Load a saved model, evaluate it on ``data``'s ``split`` and optionally write the JSON report.

    ``level="slice"`` runs :func:`evaluate_model` (2D pairs; ``max_items`` pairs at most),
    ``level="volume"`` runs :func:`evaluate_volumes` (3D; ``max_items`` expressions at most).
    ``per_pair`` adds :func:`evaluate_model`'s per-pair records (2D only); ``scales`` are the
    input scales averaged per slice (:meth:`~lsms_core.model.LSMS.predict`): by default
    :data:`~lsms_core.infer.DEFAULT_SCALES`, what ``lsms predict`` and the plugin answer with.
    (:func:`evaluate_model` alone defaults to one pass, as the Trainer's validation uses it.)

    The report is :func:`evaluate_model`'s dict plus ``model`` (path), ``model_version``,
    ``data`` (folder) and ``data_fingerprint``. ``json_out`` is written atomically.
    ``device="auto"`` picks cuda, then mps, then cpu.
    """
    from lsms_core._atomic import atomic_write_json
    from lsms_core.checkpoint import load_model
    from lsms_core.data.dataset import ReferringDataset
    from lsms_core.infer import resolve_device
    from lsms_core.model import check_scales

    if level not in ("slice", "volume"):
        raise ValueError(f"level must be 'slice' (2D pairs) or 'volume' (3D), got {level!r}")
    if per_pair and level != "slice":
        raise ValueError("per_pair records exist for level='slice' (2D pairs) only")
    scales = check_scales(scales)
    dataset = ReferringDataset(data)  # clear errors for a bad folder before loading the model
    resolved = resolve_device(device)
    model = load_model(model_path, device=resolved)
    if level == "volume":
        report = evaluate_volumes(
            model,
            dataset,
            split,
            device=resolved,
            batch_size=batch_size,
            max_expressions=max_items,
            progress=progress,
            scales=scales,
        )
    else:
        report = evaluate_model(
            model,
            dataset,
            split,
            device=resolved,
            batch_size=batch_size,
            max_items=max_items,
            progress=progress,
            per_pair=per_pair,
            scales=scales,
        )
    card = getattr(model, "model_card", {}) or {}
    report = {
        "model": str(model_path),
        "model_version": card.get("version"),
        "data": str(Path(data)),
        "data_fingerprint": dataset.fingerprint(),
        **report,
    }
    if json_out is not None:
        atomic_write_json(json_out, report)
    return report
