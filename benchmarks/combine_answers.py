"""Two ways to combine per-pair answers, scored on the same (expression, slice) pairs: averaging the
probabilities of several models (an output ensemble), and the Segmenter's post-processing applied
to each 2D slice on its own (a singular expression keeps one connected component).

    python benchmarks/combine_answers.py --data data/bench240 --split val \
        --models lsms_core/weights/default.safetensors runs/A/model.safetensors ... \
        [--scales 1 1.2] [--max-items 0]

``--scales`` is ``lsms evaluate``'s flag, with its default (:data:`lsms_core.infer.DEFAULT_SCALES`).

Rows, all on the same pairs:

* each model alone (``LSMS.predict`` at ``--scales`` with its default gate, then mask and
  presence thresholds of :data:`lsms_core.infer.THRESHOLD` (0.5), as
  :func:`lsms_core.evaluate.evaluate_model` scores it);
* ``mean of all``: the mask and presence probabilities of every model averaged, then thresholded;
* ``+ per-slice postprocess``: the first model's and the mean's probabilities passed, one slice at a
  time, through :func:`lsms_core.infer.postprocess` (what the volume Segmenter does in 3D: a singular
  expression keeps the connected component with the highest summed probability, a plural one keeps
  every component). The 2D benchmark otherwise scores the raw thresholded answer;
* ``+ oracle component choice``: of the first model's thresholded components, those that touch
  the target. It reads the truth, so it is not an answer: it bounds what any rule for choosing
  components could gain, i.e. how much of the error is segmenting the wrong lesion.

``Δ mIoU`` is each row minus the first (a bootstrap over the split's cases,
:func:`lsms_core.evaluate.paired_delta`). The probabilities are kept in memory as float32 (about
1 GB per model for the 2,336 val pairs at 320 x 320, 1.5 GB for the 3,755 test pairs); a model's
own row equals ``evaluate_model``'s figures. Choose on ``val``; score on ``test``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from _markdown import cell, print_markdown_table

COLUMNS = ("mIoU", "oIoU", "P@0.9", "negative_accuracy", "positive_empty")


def answers(model, data, split: str, scales=(1.0,), max_items: int | None = None):
    """``(mask float32 (n, H, W), presence (n,), targets bool (n, H, W), pairs info)`` of ``model``."""
    from lsms_core.evaluate import evaluation_pairs, predict_pairs

    pairs, _ = evaluation_pairs(model.config, data, split, max_items=max_items)
    masks, presence, targets, info = [], [], [], []
    for batch, mask, present in predict_pairs(model, pairs, scales=scales):  # as evaluate_model runs it
        masks.append(mask[:, 0].numpy())
        presence.append(present.numpy())
        targets.append((batch["mask"][:, 0] > 0.5).numpy())
        info += [
            {"id": i, "case": c, "z": int(z), "text": t}
            for i, c, z, t in zip(batch["id"], batch["case"], batch["z"], batch["text"])
        ]
    return np.concatenate(masks), np.concatenate(presence), np.concatenate(targets), info


def score(mask, presence, targets, info, selection: str = "none"):
    """Per-pair records (as ``evaluate_model(per_pair=True)`` gives them) and their summary.

    ``selection``: ``"none"`` (the thresholded answer), ``"postprocess"`` (each slice through
    :func:`lsms_core.infer.postprocess`) or ``"oracle"`` (of the thresholded answer's connected
    components, those that touch the target: an upper bound on what choosing components can give,
    not an answer, since it reads the truth).
    """
    from scipy import ndimage

    from lsms_core.data.expressions import expression_number
    from lsms_core.infer import THRESHOLD, postprocess
    from lsms_core.metrics import pair_stats, summarize

    records, stats = [], []
    for k, pair in enumerate(info):
        prob = mask[k]
        if selection == "postprocess":
            singular = expression_number(pair["text"]) == "singular"
            pred = postprocess(prob[None], presence[k : k + 1], singular)[0] > 0
        else:
            pred = (prob > THRESHOLD) & (presence[k] > THRESHOLD)
        if selection == "oracle" and targets[k].any():  # negatives keep their answer
            labels, _ = ndimage.label(pred, structure=np.ones((3, 3), dtype=bool))
            pred = np.isin(labels, np.unique(labels[pred & targets[k]]))
        s = pair_stats(pred, targets[k])
        stats.append(s)
        records.append({**pair, **dataclasses.asdict(s)})
    return records, summarize(stats)


def main(argv: list[str] | None = None) -> int:
    from lsms_core.cli import add_scales_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="model files; the first is the reference")
    parser.add_argument("--split", default="val")
    add_scales_argument(parser)  # the default inference of lsms predict|evaluate
    parser.add_argument("--max-items", type=int, default=0, help="pairs per model (0 = all)")
    args = parser.parse_args(argv)

    from lsms_core.checkpoint import load_model
    from lsms_core.evaluate import paired_delta
    from lsms_core.model import check_scales

    scales = check_scales(tuple(args.scales))
    runs = []
    for path in args.models:
        start = time.perf_counter()
        runs.append(answers(load_model(path), args.data, args.split, scales, args.max_items or None))
        print(f"{path}: {len(runs[-1][3])} pairs in {time.perf_counter() - start:.0f} s", flush=True)
    targets, info = runs[0][2], runs[0][3]
    if any(run[3] != info for run in runs[1:]):
        raise SystemExit("the models were scored on different pairs (their image sizes or slices differ)")

    rows = [(path, run[0], run[1], "none") for path, run in zip(args.models, runs)]
    first = rows[0]
    if len(runs) > 1:
        mean_mask = sum(run[0] for run in runs) / len(runs)
        mean_presence = sum(run[1] for run in runs) / len(runs)
        rows.append(("mean of all", mean_mask, mean_presence, "none"))
    rows.append((f"{first[0]} + per-slice postprocess", first[1], first[2], "postprocess"))
    if len(runs) > 1:
        rows.append(("mean of all + per-slice postprocess", mean_mask, mean_presence, "postprocess"))
    rows.append((f"{first[0]} + oracle component choice (upper bound)", first[1], first[2], "oracle"))

    print(f"split {args.split}, scales {list(scales)}")
    scored = [(name, *score(mask, presence, targets, info, how)) for name, mask, presence, how in rows]
    lines = []
    for name, records, summary in scored:
        delta = paired_delta(scored[0][1], records)
        lines.append(
            [
                name,
                str(summary["n"]),
                *(cell(summary[c]) for c in COLUMNS),
                f"{delta['delta']:+.3f} [{delta['lo']:+.3f}, {delta['hi']:+.3f}]",
            ]
        )
    print_markdown_table(["answer", "n", *COLUMNS, "Δ mIoU [95 %]"], lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
