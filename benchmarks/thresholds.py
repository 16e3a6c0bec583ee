"""Would other probability thresholds close the accuracy gap? A sweep of the mask threshold and of
the presence gate's threshold over one split, from a single inference of each pair (the default
inference of ``lsms evaluate``, or one pass with ``--scales 1``).

    python benchmarks/thresholds.py --data data/bench240 [--model M] [--split val] [--scales 1]

:func:`lsms_core.evaluate.evaluate_model` scores the pairs at 0.5 / 0.5 (``THRESHOLD``): a pixel is
in the mask when its probability is above the mask threshold, and the whole answer is emptied when
the presence head's probability is not above the presence threshold. Here every pair's pixel counts
are kept for each mask threshold before gating, with its presence probability, so that every
(mask, presence) pair of thresholds is scored offline with the same metrics
(:func:`lsms_core.metrics.summarize`). Choose thresholds on ``val``; score them on ``test``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from _markdown import cell, print_markdown_table

MASK_THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
PRESENCE_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
COLUMNS = ("mIoU", "oIoU", "dice", "P@0.9", "negative_accuracy", "positive_empty")


@dataclass
class PairCounts:
    """Per-pair pixel counts of a split, before the presence gate.

    ``intersection`` and ``pred_area`` are ``(pairs, len(mask_thresholds))``; ``target_area`` and
    ``presence`` (the presence head's probability) are ``(pairs,)``.
    """

    mask_thresholds: tuple[float, ...]
    intersection: np.ndarray
    pred_area: np.ndarray
    target_area: np.ndarray
    presence: np.ndarray

    def metrics(self, mask_threshold: float, presence_threshold: float) -> dict:
        """:func:`~lsms_core.metrics.summarize` of the answers at these thresholds."""
        from lsms_core.metrics import PairStats, summarize

        j = self.mask_thresholds.index(mask_threshold)
        kept = self.presence > presence_threshold
        inter = np.where(kept, self.intersection[:, j], 0)
        pred = np.where(kept, self.pred_area[:, j], 0)
        union = pred + self.target_area - inter
        return summarize(
            PairStats(int(i), int(u), int(p), int(t))
            for i, u, p, t in zip(inter, union, pred, self.target_area)
        )


def collect(
    model,
    data,
    split: str,
    mask_thresholds=MASK_THRESHOLDS,
    batch_size=16,
    max_items=None,
    progress=None,
    scales=(1.0,),
):
    """The answers' probabilities on the pairs :func:`~lsms_core.evaluate.evaluate_model` scores, run
    as it runs them (:func:`~lsms_core.evaluate.predict_pairs`: one pass by default, or ``scales``
    averaged with :meth:`~lsms_core.model.LSMS.predict`'s default gate), counted at each mask threshold."""
    import torch

    from lsms_core.evaluate import evaluation_pairs, predict_pairs

    pairs, _ = evaluation_pairs(model.config, data, split, max_items=max_items)
    inter, pred, target, presence = [], [], [], []
    for batch, prob, present in predict_pairs(model, pairs, batch_size=batch_size, scales=scales):
        prob = prob[:, 0].flatten(1)
        truth = (batch["mask"][:, 0] > 0.5).flatten(1)
        inter.append(torch.stack([((prob > t) & truth).sum(1) for t in mask_thresholds], 1))
        pred.append(torch.stack([(prob > t).sum(1) for t in mask_thresholds], 1))
        target.append(truth.sum(1))
        presence.append(present)
        if progress is not None:
            progress(sum(len(t) for t in target), len(pairs))
    return PairCounts(
        tuple(mask_thresholds),
        torch.cat(inter).numpy(),
        torch.cat(pred).numpy(),
        torch.cat(target).numpy(),
        torch.cat(presence).numpy(),
    )


def main(argv=None) -> None:
    from lsms_core.checkpoint import load_model
    from lsms_core.cli import add_scales_argument
    from lsms_core.model import check_scales

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None, help="default: the shipped model")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--min-negative-accuracy", type=float, default=0.9)
    add_scales_argument(parser)  # the default inference of lsms predict|evaluate; --scales 1: one pass
    args = parser.parse_args(argv)

    model = load_model(args.model)
    start = time.perf_counter()
    scales = check_scales(tuple(args.scales))
    counts = collect(model, args.data, args.split, max_items=args.max_items, scales=scales)
    seconds = time.perf_counter() - start
    print(
        f"## {args.split} split of {args.data}: {len(counts.presence)} pairs, scales {list(scales)} ({seconds:.0f} s)\n"
    )
    best, rows = None, []
    for t in MASK_THRESHOLDS:
        for p in PRESENCE_THRESHOLDS:
            m = counts.metrics(t, p)
            rows.append([str(t), str(p), *(cell(m[c]) for c in COLUMNS)])
            allowed = m["negative_accuracy"] is None or m["negative_accuracy"] >= args.min_negative_accuracy
            if allowed and (best is None or m["mIoU"] > best[2]["mIoU"]):
                best = (t, p, m)
    print_markdown_table(["mask thr", "presence thr", *COLUMNS], rows)
    default = counts.metrics(0.5, 0.5)
    if best is not None:
        t, p, m = best
        print(
            f"\nbest mIoU with negative accuracy >= {args.min_negative_accuracy}: mask {t}, presence {p}: "
            f"{cell(m['mIoU'])} (negatives {cell(m['negative_accuracy'])}) against {cell(default['mIoU'])} "
            f"(negatives {cell(default['negative_accuracy'])}) at 0.5 / 0.5"
        )


if __name__ == "__main__":
    main()
