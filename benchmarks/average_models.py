"""Average the weights of fine-tunes of one model into one model file (a "model soup").

    python benchmarks/average_models.py --out runs/soup/model.safetensors A.safetensors B.safetensors \
        [C.safetensors ...] [--data data/bench240]

:func:`lsms_core.checkpoint.average_models` takes the element-wise mean of the weights (the first
model's config and text encoder are kept). The new model's card lists its ingredients (file and
version) under ``extra.average_of`` and keeps their data fingerprint when they share one. With
``--data`` the card's ``metrics`` are the val figures on the same evenly spaced 300 pairs the
Trainer validates on, as for a trained model. Judge the result with ``benchmarks/input_size.py``
(all val pairs, paired interval) before ``benchmarks/accuracy.py`` on test.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model files (.safetensors) of one architecture")
    parser.add_argument("--out", required=True, help="the averaged model file (.safetensors)")
    parser.add_argument("--data", default=None, help="dataset whose val split scores the average")
    parser.add_argument("--val-items", type=int, default=300, help="val pairs scored with --data")
    args = parser.parse_args(argv)

    from lsms_core.checkpoint import average_models, read_model_card, save_model

    cards = [read_model_card(path) for path in args.models]
    fingerprints = {card.get("data_fingerprint") for card in cards}
    if len(fingerprints) > 1:
        print("warning: the models were trained on different data; the average gets no data fingerprint")
    model = average_models(args.models)
    ingredients = [
        {"file": str(path), "version": card.get("version")} for path, card in zip(args.models, cards)
    ]
    metrics, extra = {}, {"average_of": ingredients}
    if args.data:
        from lsms_core.evaluate import evaluate_model

        report = evaluate_model(model, args.data, "val", max_items=args.val_items)
        metrics = {**report["overall"], "split": "val"}
        extra["per_kind"] = report["per_kind"]  # under extra, as in the Trainer's cards
        print(
            f"val ({report['items']} pairs): mIoU {metrics['mIoU']:.3f}, negatives empty "
            f"{metrics['negative_accuracy']:.3f}"
        )
    path = save_model(
        model,
        args.out,
        metrics=metrics,
        data_fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,
        extra=extra,
    )
    print(f"saved {path} (the mean of {len(args.models)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
