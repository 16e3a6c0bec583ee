"""Multi-scale inference and its gate: one model scored on the same (expression, slice) pairs with
several ``scales`` / ``gate`` settings of :meth:`lsms_core.model.LSMS.predict`.

    python benchmarks/multiscale.py --data data/bench240 [--model M.safetensors] [--split val] \
        [--settings 1 1,1.2@0 1,1.2@0.05 1,1.2@0.1 1,1.2@0.2] [--max-items 0]

A setting is comma-separated scales, optionally ``@gate``: ``1,1.2@0`` averages every pair over
both scales, ``1,1.2@0.1`` runs the 1.2 pass only on pairs whose first-scale presence and peak mask
probability are both >= 0.1 (the others keep the first scale's answer). ``Δ mIoU`` is each row's
mIoU minus the first row's over the same pairs, with a 95 % interval from a bootstrap over the
split's cases (:func:`lsms_core.evaluate.paired_delta`); ``changed`` counts the pairs whose
predicted mask differs in area from the first row's (a gate that loses nothing leaves the same
pairs changed as the ungated average). ``s`` is the evaluation's wall time, data loading included.
Choose on ``val``; score the choice on ``test``.
"""

from __future__ import annotations

import argparse
import sys
import time

from _markdown import cell, print_markdown_table

OVERALL = ("mIoU", "oIoU", "P@0.9", "negative_accuracy", "positive_empty")


def parse_setting(text: str) -> tuple[tuple[float, ...], float | None]:
    """``"1,1.2@0.1"`` -> ``((1.0, 1.2), 0.1)``; no ``@`` -> the default gate (``None``)."""
    scales, _, gate = text.partition("@")
    try:
        return tuple(float(s) for s in scales.split(",")), (float(gate) if gate else None)
    except ValueError:
        raise SystemExit(f"a setting is scales[@gate], e.g. 1,1.2@0.1; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--split", default="val")
    parser.add_argument(
        "--settings", nargs="+", default=["1", "1,1.2@0", "1,1.2@0.05", "1,1.2@0.1", "1,1.2@0.2"]
    )
    parser.add_argument("--max-items", type=int, default=0, help="pairs per evaluation (0 = all)")
    args = parser.parse_args(argv)
    settings = [(text, *parse_setting(text)) for text in args.settings]

    import torch

    from lsms_core.checkpoint import default_model_path, load_model
    from lsms_core.evaluate import evaluate_model, paired_delta

    path = args.model or str(default_model_path())
    model = load_model(path)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {path}; split {args.split}")
    rows = []
    for text, scales, gate in settings:
        start = time.perf_counter()
        report = evaluate_model(
            model,
            args.data,
            args.split,
            max_items=args.max_items or None,
            per_pair=True,
            scales=scales,
            gate=gate,
        )
        rows.append((text, report, time.perf_counter() - start))
        print(f"{text}: mIoU {report['overall']['mIoU']:.4f} in {rows[-1][2]:.0f} s", flush=True)

    first = rows[0][1]["pairs"]
    header = ["setting", "gate", "n", *OVERALL, "Δ mIoU [95 %]", "changed", "s"]
    lines = []
    for text, report, seconds in rows:
        pairs = report["pairs"]
        delta = paired_delta(first, pairs)
        changed = sum(a["pred_area"] != b["pred_area"] for a, b in zip(first, pairs))
        lines.append(
            [
                text.partition("@")[0],
                cell(report["gate"]),
                str(report["overall"]["n"]),
                *(cell(report["overall"].get(c)) for c in OVERALL),
                f"{delta['delta']:+.3f} [{delta['lo']:+.3f}, {delta['hi']:+.3f}]",
                str(changed),
                f"{seconds:.0f}",
            ]
        )
    print_markdown_table(header, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
