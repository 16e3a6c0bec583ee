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

A third table asks what could decide the pair from the slice alone (:func:`decided_by`): the
query's in-plane words (:data:`IN_PLANE_FILTERS`: contrast, look, lobe and front/back half, near the
surface) applied to the lesions the slice shows; failing that, a superlative judged by the lesions'
areas on the slice; otherwise only the volume decides (superior/inferior half, dome, segment, size
in mm, a superlative the slice's areas get wrong). Lesion attributes are measured again from each
case (``lesion_attributes``, lesion types from ``dataset.json``) and checked against the records:
every query must resolve to its targets.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
from _markdown import print_markdown_table

SHARE_BANDS = ((0.25, "tip or edge (< 25 %)"), (0.6, "25-60 %"), (float("inf"), "core (>= 60 %)"))
CONTENT = ("only the target(s)", "another lesion too")
#: Query filters whose value a slice shows for a lesion on it: its contrast and look, its lobe and
#: front/back half (in-plane position), whether it touches the liver surface. The others (superior /
#: inferior half, dome, segment, size class and diameter in mm) and the superlatives (volume rank)
#: are properties of the whole volume.
IN_PLANE_FILTERS = ("attenuation", "appearance", "side", "ap", "subcapsular")
DECIDED_BY = (
    "the in-plane words",
    "in-plane words + areas on the slice",
    "only the volume",
    "(no query)",
)


def share_band(share: float) -> str:
    return next(name for bound, name in SHARE_BANDS if share < bound)


def decided_by(query: dict | None, targets, areas: dict[int, int], attributes: dict) -> str:
    """What picks the referent among the lesions a slice shows (one of :data:`DECIDED_BY`).

    ``areas``: each lesion's pixels on the slice; ``attributes``: lesion id ->
    :class:`~lsms_core.data.expressions.LesionAttributes`. The in-plane words decide when the
    query's :data:`IN_PLANE_FILTERS` alone, applied to the shown lesions, select exactly the shown
    targets; a "largest"/"smallest" query with one shown target is decided by the slice's areas
    when, among the shown lesions that fit the in-plane words, the target has the largest
    (smallest) area there.
    """
    if not query:
        return DECIDED_BY[3]
    shown = {int(i) for i, area in areas.items() if area > 0}
    shown_targets = {int(t) for t in targets} & shown
    fitting = {
        i
        for i in shown
        if all(getattr(attributes[i], k) == v for k, v in query["filters"].items() if k in IN_PLANE_FILTERS)
    }
    if fitting == shown_targets:
        return DECIDED_BY[0]
    selector = query.get("selector")
    if selector in ("largest", "smallest") and len(shown_targets) == 1 and shown_targets <= fitting:
        pick = (max if selector == "largest" else min)(sorted(fitting), key=lambda i: areas[i])
        if {pick} == shown_targets:
            return DECIDED_BY[1]
    return DECIDED_BY[2]


def case_attributes(dataset, case_id: str) -> dict:
    """Lesion id -> ``LesionAttributes`` of a case, measured as the generator measured them."""
    from lsms_core.data.expressions import lesion_attributes

    case = dataset.load_case(case_id)
    details = (dataset.meta.get("provenance") or {}).get("case_details", {}).get(case_id, {})
    kinds = {int(lesion["id"]): lesion["kind"] for lesion in details.get("lesions", []) if "kind" in lesion}
    attrs = lesion_attributes(
        case.image.array, case.lesions, case.organ, case.image.scale, appearance=kinds or None
    )
    return {a.id: a for a in attrs}


def pair_groups(report: dict, data, split: str) -> list[dict]:
    """One row per positive pair of ``report`` (``evaluate_model(..., per_pair=True)``): its IoU,
    whether another lesion shows, the target's cross-section band, the query's words and what
    decides it on the slice (:func:`decided_by`)."""
    from lsms_core.data.dataset import ReferringDataset, other_lesion_on_slice
    from lsms_core.data.expressions import resolve

    dataset = data if isinstance(data, ReferringDataset) else ReferringDataset(data)
    records = {r["id"]: r for r in dataset.expressions(split)}
    areas: dict[str, dict[int, np.ndarray]] = {}
    attributes: dict[str, dict] = {}
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
        if query and pair["case"] not in attributes:
            attributes[pair["case"]] = case_attributes(dataset, pair["case"])
        if query and resolve(query, attributes[pair["case"]].values()) != set(targets):
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
                "decided_by": decided_by(
                    query,
                    targets,
                    {i: int(a[z]) for i, a in per_lesion.items()},
                    attributes.get(pair["case"], {}),
                ),
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
        for d in DECIDED_BY
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
