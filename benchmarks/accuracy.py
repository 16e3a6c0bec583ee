"""Accuracy of a model: test-split figures (2D slices, overall and per expression kind), the same
split in 3D (one Segmenter answer per expression over its whole case) and the 3D answer on the
sample CT for each of its expressions.

    python benchmarks/accuracy.py --data data/bench48 [--model lsms_core/weights/default.safetensors]

The 2D figures come from :func:`lsms_core.evaluate.evaluate_model` (the paper's protocol: every
(expression, slice) pair of the split); the sample figures run :class:`lsms_core.infer.Segmenter`
over the whole sample volume, as ``lsms predict`` and the napari widget do, and compare the 3D mask
with the sample's truth (Dice; an expression that refers to nothing must give an empty mask).
The 3D split figures come from :func:`lsms_core.evaluate.evaluate_volumes` (``--no-volumes`` skips them).

``--from-report REPORT.json`` prints the 2D tables of a saved report (``lsms evaluate --json`` or
this script's ``--json``) without evaluating again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _markdown import cell, print_markdown_table

COLUMNS = (
    "n",
    "mIoU",
    "oIoU",
    "dice",
    "P@0.5",
    "P@0.6",
    "P@0.7",
    "P@0.8",
    "P@0.9",
    "negative_accuracy",
    "positive_missed",
    "positive_empty",
)


def print_split_table(report: dict, group: str = "per_kind") -> None:
    """Overall + one row per kind (``group="per_kind"``), per target size (``"per_target_size"``) or
    per slice content (``"per_slice_content"``)."""
    label = {"per_kind": "kind", "per_target_size": "target share of the slice"}.get(group, "the slice shows")
    groups = sorted(report[group].items()) if group == "per_kind" else list(report[group].items())
    rows = [("overall", report["overall"])] + groups
    print_markdown_table([label, *COLUMNS], [[kind, *(cell(m.get(c)) for c in COLUMNS)] for kind, m in rows])


def print_2d_report(report: dict, data) -> None:
    """The 2D tables of an :func:`~lsms_core.evaluate.evaluate_path` report: per kind, then per target size."""
    print(
        f"## {report['split']} split of {data}: {report['items']} (expression, slice) pairs, "
        f"model {report.get('model')}, scales {report.get('scales', [1.0])} (gate {report.get('gate')})"
    )
    print_split_table(report)
    print(f"\n## The same pairs by target size (share of the {report['image_size']}^2 slice; positives only)")
    print_split_table(report, "per_target_size")
    if report.get("per_slice_content"):  # reports written before it existed lack it
        print("\n## The same pairs by what else the slice shows (positives only)")
        print_split_table(report, "per_slice_content")


def sample_dice(model_path: str | None) -> list[dict]:
    import numpy as np

    from lsms_core.data.sample import load_sample
    from lsms_core.infer import Segmenter
    from lsms_core.metrics import dice

    sample = load_sample()
    segmenter = Segmenter(model_path, device="cpu")
    rows = []
    for record in sample.expressions:
        truth = np.isin(sample.lesions, record.get("targets") or [])
        result = segmenter.segment(sample.image, record["expression"])
        pred = result.mask > 0
        score = dice(pred, truth)  # None for a negative (empty truth)
        rows.append(
            {
                "expression": record["expression"],
                "kind": record.get("kind"),
                "targets": record.get("targets"),
                "found": result.found,
                "dice": None if score is None else round(score, 3),
                "empty_when_negative": None if truth.any() else not pred.any(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset folder with a test split")
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", default=None, help="also write all figures to this JSON file")
    parser.add_argument("--no-volumes", action="store_true", help="skip the 3D evaluation of the split")
    parser.add_argument("--from-report", default=None, help="print the 2D tables of this saved report")
    args = parser.parse_args(argv)

    if args.from_report:
        saved = json.loads(Path(args.from_report).read_text())
        report = saved["split"] if isinstance(saved.get("split"), dict) else saved  # ours, or lsms evaluate's
        print_2d_report(report, report.get("data"))
        return 0

    from lsms_core.checkpoint import default_model_path
    from lsms_core.evaluate import evaluate_path

    model = args.model or str(default_model_path())
    report = evaluate_path(model, args.data, split=args.split)
    print_2d_report(report, args.data)

    volumes = None
    if not args.no_volumes:
        volumes = evaluate_path(model, args.data, split=args.split, level="volume")
        print(
            f"\n## {args.split} split in 3D (Segmenter over each whole case): {volumes['items']} expressions"
        )
        print_split_table(volumes)

    rows = sample_dice(args.model)
    positives = [r["dice"] for r in rows if r["dice"] is not None]
    negatives = [r["empty_when_negative"] for r in rows if r["empty_when_negative"] is not None]
    print("\n## Sample CT (3D, Segmenter): Dice per expression")
    print("| expression | kind | targets | found | Dice / empty |")
    print("|---|---|---|---|---|")
    for r in rows:
        answer = (
            r["dice"] if r["dice"] is not None else ("empty" if r["empty_when_negative"] else "NOT empty")
        )
        print(f"| {r['expression']} | {r['kind']} | {r['targets']} | {r['found']} | {answer} |")
    if positives:
        print(
            f"\nmean Dice over {len(positives)} positive expressions: {sum(positives) / len(positives):.3f}"
        )
        print(f"expressions with Dice >= 0.7: {sum(d >= 0.7 for d in positives)} / {len(positives)}")
    if negatives:
        print(f"negative expressions answered empty: {sum(negatives)} / {len(negatives)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"split": report, "volumes": volumes, "sample": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
