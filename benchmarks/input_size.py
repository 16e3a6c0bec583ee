"""Does a larger model input help? Models scored side by side at several input sizes on the same
(expression, slice) pairs.

    python benchmarks/input_size.py --data data/bench240 --models A.safetensors B.safetensors \
        [--sizes 256 320 384] [--split val] [--max-items 600]

Each model is evaluated with :func:`lsms_core.evaluate.evaluate_model` at each ``--sizes`` input
side (``image_size``; the weights are size-independent, the slices and targets are resized to it
and scored there) on the same evenly spaced subset of the split's pairs. The table gives the overall
figures and mIoU per target size (:data:`lsms_core.evaluate.TARGET_SIZE_GROUPS`), so it shows where a
size helps (small targets) and where it hurts; ``Δ mIoU`` is each row's mIoU minus the first row's over
the same pairs, with a 95 % interval from a bootstrap over the split's cases
(:func:`lsms_core.evaluate.paired_delta`): an interval that holds 0 is no measured difference.
Choose on ``val``; score the choice on ``test``.
"""

from __future__ import annotations

import argparse
import sys
import time

from _markdown import cell, print_markdown_table

OVERALL = ("mIoU", "P@0.9", "negative_accuracy", "positive_empty")


def sweep(models: dict, data, split: str, sizes, max_items: int | None = None) -> list[dict]:
    """One row per (model name, size): ``{"model", "size", "seconds", "report"}``."""
    from lsms_core.evaluate import evaluate_model

    rows = []
    for name, model in models.items():
        for size in sizes:
            start = time.perf_counter()
            report = evaluate_model(model, data, split, image_size=size, max_items=max_items, per_pair=True)
            rows.append(
                {"model": name, "size": int(size), "seconds": time.perf_counter() - start, "report": report}
            )
    return rows


def print_table(rows: list[dict]) -> None:
    from lsms_core.evaluate import paired_delta

    groups = list(rows[0]["report"]["per_target_size"])
    header = ["model", "input", "n", *OVERALL, "Δ mIoU [95 %]", *(f"mIoU {g}" for g in groups), "s"]
    first = rows[0]["report"]["pairs"]
    lines = []
    for row in rows:
        report = row["report"]
        overall = report["overall"]
        cells = [row["model"], str(row["size"]), str(overall["n"])]
        cells += [cell(overall.get(c)) for c in OVERALL]
        delta = paired_delta(first, report["pairs"])
        cells.append(f"{delta['delta']:+.3f} [{delta['lo']:+.3f}, {delta['hi']:+.3f}]")
        cells += [cell(report["per_target_size"].get(g, {}).get("mIoU")) for g in groups]
        lines.append([*cells, f"{row['seconds']:.0f}"])
    print_markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="model files (.safetensors)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 320, 384])
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-items", type=int, default=600, help="pairs per evaluation (0 = all)")
    args = parser.parse_args(argv)

    import torch

    from lsms_core.checkpoint import load_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); split {args.split}")
    models, shared = {}, {}
    for path in args.models:
        model = load_model(path, **shared)  # a file with its own encoder weights loads into a copy
        if not shared and not model.model_card.get("includes_text_encoder"):
            # only the package's encoder is shared, never a fine-tuned one
            shared = {"text_encoder": model.text_encoder, "tokenizer": model.tokenizer}
        models[path] = model
        print(f"{path}: trained at image_size {model.config.image_size}")
    rows = sweep(models, args.data, args.split, args.sizes, max_items=args.max_items or None)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
