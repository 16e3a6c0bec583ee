"""Do the words steer the answer between two lesions of one slice?

    python benchmarks/word_swap.py --data data/bench240 --split val [--model M] [--scales 1]

On every slice that shows two lesions A and B, each the only target of a singular expression of its
own (the first such expression of the split for each lesion), the model answers A's words and B's
words. A model that follows the words marks A for the first and B for the second, so its two answers
barely overlap; a model that ignores them gives the same answer twice. Printed: the IoU of the two
answers with each other, how often an answer covers most (> 50 %) of the other lesion, and each
answer's IoU with its own lesion; then the same by the two lesions' types when the data records
them (``ReferringDataset.lesion_kinds``: "cyst / metastasis", "same type", ...). Answers are made as :func:`lsms_core.evaluate.evaluate_model`
makes them (:func:`~lsms_core.evaluate.predict_pairs`, mask and presence above 0.5); ``--scales``
as ``lsms evaluate``, the default inference by default.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _markdown import print_markdown_table


def two_lesion_pairs(slices) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` into ``slices`` (a :class:`~lsms_core.data.dataset.SliceDataset`):
    items of one slice whose expressions are singular and name one lesion each, A for ``i`` and B
    for ``j`` (A's id below B's), one expression per lesion: its first in the split."""
    from lsms_core.data.expressions import expression_number

    first: dict[tuple[str, int], int] = {}  # (case, lesion) -> record index of its first expression
    for index, record in enumerate(slices.records):
        targets = record.get("targets") or []
        if len(targets) == 1 and expression_number(record["expression"]) == "singular":
            first.setdefault((record["case"], int(targets[0])), index)
    item_of: dict[int, dict[int, int]] = {}  # record index -> slice -> item index (target shown)
    for i, (record, z, present) in enumerate(slices.items):
        if present:
            item_of.setdefault(record, {})[z] = i
    pairs = []
    for (case, a), record_a in sorted(first.items()):
        for (case_b, b), record_b in sorted(first.items()):
            if case_b == case and b > a:
                shown_a, shown_b = item_of.get(record_a, {}), item_of.get(record_b, {})
                pairs += [(shown_a[z], shown_b[z]) for z in sorted(shown_a.keys() & shown_b.keys())]
    return pairs


def pair_scores(answer_a, answer_b, lesion_a, lesion_b) -> dict:
    """Boolean masks of one slice -> the two answers' IoU with each other, each answer's IoU with
    its own lesion and the share of the other lesion it covers (``own``/``other``: A's, then B's)."""

    from lsms_core.metrics import iou, pair_stats

    def covered(p, lesion):
        stats = pair_stats(p, lesion)
        return stats.intersection / max(stats.target_area, 1)

    both = pair_stats(answer_a, answer_b)
    return {
        "agreement": both.intersection / both.union if both.union else 1.0,  # two empty answers agree
        "own": [iou(answer_a, lesion_a), iou(answer_b, lesion_b)],
        "other": [covered(answer_a, lesion_b), covered(answer_b, lesion_a)],
    }


def score_pairs(pairs: list, answers: list, lesions: list) -> tuple[list, list[dict]]:
    """:func:`pair_scores` of each pair, from the answers and lesion masks in pair order (A, B, A,
    B, ...). A pair is left out when either lesion is empty at the model's input: a lesion tip of a
    pixel or two can vanish when the slice is resized, and then the slice no longer shows both
    lesions to the model. Returns the kept pairs and their scores."""
    kept = [k for k in range(len(pairs)) if lesions[2 * k].any() and lesions[2 * k + 1].any()]
    scores = [
        pair_scores(answers[2 * k], answers[2 * k + 1], lesions[2 * k], lesions[2 * k + 1]) for k in kept
    ]
    return [pairs[k] for k in kept], scores


def type_pair(slices, i: int, j: int) -> str:
    """The types of the two lesions of pair ``(i, j)`` (items of ``slices``): ``"same type"``,
    ``"a / b"`` in alphabetical order, or ``"types not recorded"``."""
    (ri, _, _), (rj, _, _) = slices.items[i], slices.items[j]
    a, b = slices.records[ri], slices.records[rj]
    kinds = slices.dataset.lesion_kinds(a["case"])
    types = [kinds.get(int(a["targets"][0])), kinds.get(int(b["targets"][0]))]
    if None in types:
        return "types not recorded"
    return "same type" if types[0] == types[1] else " / ".join(sorted(types))


def summary_row(name: str, scores: list[dict]) -> list[str]:
    agreement = np.array([s["agreement"] for s in scores])
    own = np.array([v for s in scores for v in s["own"]])
    other = np.array([v for s in scores for v in s["other"]])
    return [
        name,
        str(len(scores)),
        f"{agreement.mean():.3f} / {np.median(agreement):.3f}",
        f"{(other > 0.5).mean():.3f}",
        f"{own.mean():.3f}",
    ]


HEADER = [
    "slices of",
    "slices",
    "IoU of the two answers (mean / median)",
    "answers covering most of the other lesion",
    "answers' IoU with their own lesion",
]


def main(argv: list[str] | None = None) -> int:
    from lsms_core.cli import add_scales_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    add_scales_argument(parser)
    args = parser.parse_args(argv)

    from torch.utils.data import Subset

    from lsms_core.checkpoint import load_model
    from lsms_core.evaluate import THRESHOLD, evaluation_pairs, predict_pairs
    from lsms_core.model import check_scales

    scales = check_scales(tuple(args.scales))
    model = load_model(args.model)
    slices = evaluation_pairs(model.config, args.data, args.split)[0].dataset
    pairs = two_lesion_pairs(slices)
    if not pairs:
        parser.error(f"no slice of the {args.split} split shows two lesions with an expression each")
    start = time.perf_counter()
    order = [index for pair in pairs for index in pair]
    answers, lesions = [], []
    for batch, mask_prob, presence_prob in predict_pairs(model, Subset(slices, order), scales=scales):
        answer = (mask_prob > THRESHOLD) & (presence_prob > THRESHOLD)[:, None, None, None]
        answers += list(answer[:, 0].cpu().numpy())
        lesions += list((batch["mask"][:, 0] > 0.5).numpy())
    pairs, scores = score_pairs(pairs, answers, lesions)
    dropped = len(order) // 2 - len(pairs)
    print(
        f"{args.split} split of {args.data}, scales {list(scales)}: {len(pairs)} slices "
        f"({time.perf_counter() - start:.0f} s)"
        + (f"; {dropped} left out, where a lesion vanishes at the model's input size" if dropped else "")
        + "\n"
    )
    print_markdown_table(HEADER, [summary_row(f"{args.data} {args.split}", scores)])
    by_type: dict[str, list[dict]] = {}
    for (i, j), score in zip(pairs, scores):
        by_type.setdefault(type_pair(slices, i, j), []).append(score)
    print()
    print_markdown_table(
        ["the two lesions", *HEADER[1:]], [summary_row(k, v) for k, v in sorted(by_type.items())]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
