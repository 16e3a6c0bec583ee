"""Where the model's 2D answers fail: mIoU of the positive pairs by what else the slice shows, by how
much of the target's largest cross-section the slice holds, and by the words of the expression.

    python benchmarks/where_it_fails.py --data data/bench240 --split val [--model M] [--scales 1]
        [--max-items N] [--report REPORT.json]

The pairs are :func:`lsms_core.evaluate.evaluate_model`'s (``--scales`` as ``lsms evaluate``, the
default inference by default). A target lesion's *cross-section share* on a slice is its area there
over its largest area on any slice (for several targets, the largest share): under 25 % the slice
holds a tip or an edge of the lesion, from 60 % its core. "Another lesion too": the slice also shows
a lesion the expression does not refer to, so the words must pick one. The last table groups the
pairs by each filter and selector of the expression's query (a pair counts under each of its
words; records without a query, such as drawn corrections, count as ``(no query)``).

A third table asks what could decide the pair from the slice alone
(:func:`lsms_core.data.expressions.decided_on_slice`): the query's in-plane words
(``IN_PLANE_FILTERS``: contrast, look, lobe and front/back half, near the
surface) applied to the lesions the slice shows; failing that, a superlative judged by the lesions'
areas on the slice; otherwise only the volume decides (superior/inferior half, dome, segment, size
in mm, a superlative the slice's areas get wrong). Lesion attributes are measured again from each
case (``ReferringDataset.lesion_attributes``) and checked against the records: every query must
resolve to its targets.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
from _markdown import print_markdown_table

from lsms_core.data.expressions import SLICE_DECIDERS

SHARE_BANDS = ((0.25, "tip or edge (< 25 %)"), (0.6, "25-60 %"), (float("inf"), "core (>= 60 %)"))
CONTENT = ("only the target(s)", "another lesion too")


def share_band(share: float) -> str:
    return next(name for bound, name in SHARE_BANDS if share < bound)


def pair_groups(report: dict, data, split: str) -> list[dict]:
    """One row per positive pair of ``report`` (``evaluate_model(..., per_pair=True)``): its IoU,
    whether another lesion shows, the target's cross-section band, the query's words and what
    decides it on the slice (``ReferringDataset.decided_on_slice``)."""
    from lsms_core.data.dataset import ReferringDataset, other_lesion_on_slice
    from lsms_core.data.expressions import resolve

    dataset = data if isinstance(data, ReferringDataset) else ReferringDataset(data)
    records = {r["id"]: r for r in dataset.expressions(split)}
    areas: dict[str, dict[int, np.ndarray]] = {}
    rows = []
    for pair in report["pairs"]:
        if not pair["target_area"]:
            continue
        record, z = records[pair["id"]], pair["z"]
        if pair["case"] not in areas:
            lesions = dataset.load_case(pair["case"]).lesions  # canonical, as the pairs' z
            areas[pair["case"]] = {int(i): (lesions == i).sum((1, 2)) for i in np.unique(lesions) if i > 0}
        per_lesion = areas[pair["case"]]
        targets = [int(t) for t in record["targets"]]
        share = max(per_lesion[t][z] / per_lesion[t].max() for t in targets if t in per_lesion)
        others = other_lesion_on_slice(z, targets, dataset.case_info(pair["case"])["lesions"])
        query = record.get("query") or {}
        attributes = dataset.lesion_attributes(pair["case"]) if query else {}
        if query and resolve(query, attributes.values()) != set(targets):
            raise ValueError(
                f"{record['id']}: its query does not resolve to its targets {targets} with the lesion "
                "attributes measured again; the dataset does not match this version's measurements"
            )
        words = [*query.get("filters", {})] + (
            [f"selector: {query['selector']}"] if query.get("selector") else []
        )
        rows.append(
            {
                "iou": pair["intersection"] / pair["union"],
                "content": CONTENT[others],
                "band": share_band(float(share)),
                "words": words or ["(no query)"],
                "decided_by": dataset.decided_on_slice(record, z),
            }
        )
    return rows


def tables(rows: list[dict]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """(content x cross-section band, words x content, what decides x content) markdown rows:
    ``mIoU (n)`` per cell."""

    def cell(values):
        return f"{np.mean(values):.3f} ({len(values)})" if values else "-"

    by_band = collections.defaultdict(list)
    by_words = collections.defaultdict(list)
    for r in rows:
        by_band[(r["content"], r["band"])].append(r["iou"])
        by_band[(r["content"], "all")].append(r["iou"])
        for w in r["words"]:
            by_words[(w, r["content"])].append(r["iou"])
    bands = [name for _, name in SHARE_BANDS] + ["all"]
    first = [[content, *(cell(by_band[(content, b)]) for b in bands)] for content in CONTENT]
    first.append(["all", *(cell([r["iou"] for r in rows if b in ("all", r["band"])]) for b in bands)])
    words = sorted({w for w, _ in by_words}, key=lambda w: -sum(len(by_words[(w, c)]) for c in CONTENT))
    second = [[w, *(cell(by_words[(w, c)]) for c in CONTENT)] for w in words]
    third = [
        [d, *(cell([r["iou"] for r in rows if (r["decided_by"], r["content"]) == (d, c)]) for c in CONTENT)]
        for d in SLICE_DECIDERS
    ]
    return first, second, third


def main(argv: list[str] | None = None) -> int:
    from lsms_core.cli import add_scales_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--max-items", type=int, default=0, help="pairs, evenly spaced (0 = all)")
    add_scales_argument(parser)
    parser.add_argument(
        "--report", default=None, help="group the pairs of this saved per-pair report instead of evaluating"
    )
    args = parser.parse_args(argv)

    from lsms_core.checkpoint import load_model
    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import check_scales

    start = time.perf_counter()
    if args.report:  # a saved evaluate_model(..., per_pair=True) report of this split
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
        if report.get("split") != args.split or "pairs" not in report:
            parser.error(f"{args.report} is not a per-pair report of the {args.split} split")
        scales = tuple(report["scales"])
    else:
        scales = check_scales(tuple(args.scales))
        report = evaluate_model(
            load_model(args.model),
            args.data,
            args.split,
            scales=scales,
            per_pair=True,
            max_items=args.max_items or None,
        )
    rows = pair_groups(report, args.data, args.split)
    print(
        f"{args.split} split of {args.data}, scales {list(scales)}: {len(rows)} positive pairs, "
        f"mIoU {report['overall']['mIoU']:.3f} ({time.perf_counter() - start:.0f} s)\n"
    )
    first, second, third = tables(rows)
    print_markdown_table(["the slice shows", *(name for _, name in SHARE_BANDS), "all"], first)
    print()
    print_markdown_table(["words of the query", *CONTENT], second)
    print()
    print_markdown_table(["on the slice, what decides", *CONTENT], third)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
