"""Which 3D connected component should a singular expression keep? Selection rules side by side
on the same volume predictions.

    python benchmarks/component_rule.py --data data/bench240 [--model M] [--split val]
        [--max-expressions N]

:class:`lsms_core.infer.Segmenter` thresholds the per-slice probabilities, gates slices by their
presence score and, for a singular expression ("the smallest lesion"), keeps one 3D connected
component: the one with the highest *summed* probability (``lsms_core.infer.postprocess``). A sum
favours large components, which is a risk for "the smallest ..." and for a small lesion described
beside a large one. Here every expression of the split is segmented once (``return_probability``);
every component the thresholds leave is labelled, and each rule picks one for the singular
expressions (plural ones keep what the Segmenter returned):

* ``sum``: highest summed probability (what the Segmenter does; checked to give its masks);
* ``mean``: highest mean probability (confidence, whatever the size);
* ``peak``: highest single-voxel probability;
* ``size_rank``: for "largest"/"biggest"/"smallest" expressions the largest / smallest component
  by voxels, else ``sum``;
* ``keep_all``: no selection (every component), to show what selection is worth.

The table gives the 3D metrics of each rule (overall and for the singular expressions by kind).
Choose on ``val``; score the choice on ``test``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from _markdown import cell, print_markdown_table

RULES = ("sum", "mean", "peak", "size_rank", "keep_all")
COLUMNS = ("mIoU", "oIoU", "dice", "P@0.5", "negative_accuracy")
_LARGEST = re.compile(r"\b(largest|biggest|dominant)\b", re.IGNORECASE)
_SMALLEST = re.compile(r"\bsmallest\b", re.IGNORECASE)


def select(candidates: np.ndarray, prob: np.ndarray, rule: str, text: str) -> np.ndarray:
    """The mask ``rule`` keeps of ``candidates`` (every component the thresholds left)."""
    from scipy import ndimage

    labels, n = ndimage.label(candidates, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1 or rule == "keep_all":
        return candidates.astype(bool)
    index = np.arange(1, n + 1)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if rule == "size_rank" and _SMALLEST.search(text):
        scores = -sizes
    elif rule == "size_rank" and _LARGEST.search(text):
        scores = sizes
    elif rule in ("sum", "size_rank"):
        scores = ndimage.sum_labels(prob, labels, index)
    elif rule == "mean":
        scores = ndimage.mean(prob, labels, index)
    elif rule == "peak":
        scores = ndimage.maximum(prob, labels, index)
    else:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    return labels == int(index[int(np.argmax(scores))])


def compare(model, data, split: str, max_expressions: int | None = None) -> dict:
    """``{rule: {"overall": {...}, "singular": {kind: {...}}}}`` over the split's expressions."""
    from lsms_core.data.dataset import ReferringDataset
    from lsms_core.data.expressions import expression_number
    from lsms_core.evaluate import evenly_spaced
    from lsms_core.infer import Segmenter, postprocess
    from lsms_core.metrics import MetricAccumulator

    dataset = data if isinstance(data, ReferringDataset) else ReferringDataset(data)
    segmenter = model if isinstance(model, Segmenter) else Segmenter(model)
    every = dataset.expressions(split)
    records = sorted((every[i] for i in evenly_spaced(len(every), max_expressions)), key=lambda r: r["case"])
    overall = {rule: MetricAccumulator() for rule in RULES}
    singular = {rule: MetricAccumulator() for rule in RULES}
    for record in records:
        case = dataset.load_case(record["case"])
        text = record["expression"]
        result = segmenter.segment(case.image, text, return_probability=True)
        target = dataset.target_mask(record, case) > 0
        kind = record.get("kind") or None
        is_singular = expression_number(text) == "singular"
        if is_singular:
            candidates = postprocess(result.probability, result.slice_scores, singular=False)
            if not np.array_equal(select(candidates, result.probability, "sum", text), result.mask > 0):
                raise RuntimeError(f"the 'sum' rule does not reproduce the Segmenter's mask for {text!r}")
        for rule in RULES:
            mask = select(candidates, result.probability, rule, text) if is_singular else result.mask > 0
            overall[rule].update(mask, target, kind)
            if is_singular:
                singular[rule].update(mask, target, kind)
    report = {}
    for rule in RULES:
        scores = overall[rule].compute()
        scores.pop("per_kind", None)
        report[rule] = {"overall": scores, "singular": singular[rule].compute().get("per_kind", {})}
    return {"items": len(records), "rules": report}


def print_table(report: dict) -> None:
    header = ["rule", *COLUMNS, *(f"mIoU {k} (singular)" for k in _kinds(report))]
    rows = []
    for rule, row in report["rules"].items():
        cells = [rule, *(cell(row["overall"].get(c)) for c in COLUMNS)]
        rows.append(cells + [cell(row["singular"].get(k, {}).get("mIoU")) for k in _kinds(report)])
    print_markdown_table(header, rows)


def _kinds(report: dict) -> list[str]:
    first = next(iter(report["rules"].values()))
    return [k for k, v in first["singular"].items() if v.get("mIoU") is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-expressions", type=int, default=0, help="0 = all")
    args = parser.parse_args(argv)

    from lsms_core.checkpoint import load_model

    start = time.perf_counter()
    report = compare(load_model(args.model), args.data, args.split, args.max_expressions or None)
    print(f"split {args.split}: {report['items']} expressions, {time.perf_counter() - start:.0f} s")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
