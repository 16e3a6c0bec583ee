"""Can a small learned scorer choose which component of the answer the words mean? (not adopted)

    python benchmarks/learned_choice.py --train-data data/extra960_seed4 --train-items 10000 \
        --eval data/extra960_seed4:val:3000 data/bench240:val:0 [--epochs 20] [--dropout 0.3] [--seed 0]

The error left in the shipped model is mostly a mask on the wrong lesion (the oracle of
``combine_answers.py``). This script answers every pair with the shipped model (default inference:
scales 1 and 1.2, gated), splits each thresholded answer into connected components (8-connected),
describes each component by what it is on the slice (area, summed / peak / mean probability,
mean intensity and its contrast with a ring around it, centroid, each as a value and as a rank
among the answer's components) and trains a small MLP on ``[features, sentence embedding of the
frozen text encoder]`` to say whether the component lies on the target (at least half of it).
Training pairs come from ``--train-data`` (use cases the model never trained on: the default
model never saw ``data/extra960_seed4``); only answers with two or more components count.

Rows, on the pairs of each ``--eval`` (``DATA:SPLIT:MAX_ITEMS``, 0 = all pairs):

* ``raw``: the thresholded answer, as ``evaluate_model`` scores it (a check: its mIoU is the
  model's);
* ``sum rule``: a singular expression keeps its component with the highest summed probability,
  what :func:`lsms_core.infer.postprocess` does (here per slice);
* ``learned``: a singular expression keeps its best-scored component, a plural one those scored
  above 0.5 (at least the best);
* ``learned, no text``: the same scorer trained and run with the sentence zeroed (a control: what
  it learns about components alone, not about the words);
* ``oracle``: the components that touch the target (reads the truth: an upper bound).

Answers with fewer than two components keep their answer in every row. ``Δ mIoU`` is each row
minus ``raw`` with a 95 % interval over cases (:func:`lsms_core.evaluate.paired_delta`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _markdown import print_markdown_table

FEATURES = 23


def components(model, data: str, split: str, max_items: int | None, scales):
    """Per-pair records and per-component measurements of ``model``'s answers on a split."""
    import torch
    from scipy import ndimage

    from lsms_core.data.expressions import expression_number
    from lsms_core.evaluate import evaluation_pairs, predict_pairs
    from lsms_core.infer import THRESHOLD

    pairs, _ = evaluation_pairs(model.config, data, split, max_items=max_items)
    size = model.config.image_size
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    eight = np.ones((3, 3), dtype=bool)
    ring = np.ones((7, 7), dtype=bool)
    records, comps = [], []
    for batch, mask, present in predict_pairs(model, pairs, scales=scales):
        mask, present = mask[:, 0].numpy(), present.numpy()
        middle = batch["image"][:, batch["image"].shape[1] // 2].numpy()
        targets = (batch["mask"][:, 0] > 0.5).numpy()
        for b in range(len(mask)):
            pred = (mask[b] > THRESHOLD) & (present[b] > THRESHOLD)
            labels, n = ndimage.label(pred, structure=eight)
            index = np.arange(1, n + 1)
            cs = []
            if n:
                area = ndimage.sum_labels(pred, labels, index)
                for j, lab in enumerate(index):
                    inside = labels == lab
                    around = ndimage.binary_dilation(inside, ring) & ~pred
                    image = middle[b]
                    cs.append(
                        {
                            "area": float(area[j]),
                            "inter": float((inside & targets[b]).sum()),
                            "psum": float(mask[b][inside].sum()),
                            "pmax": float(mask[b][inside].max()),
                            "image": float(image[inside].mean()),
                            "ring": float(image[around].mean() if around.any() else image[inside].mean()),
                            "cy": float(yy[inside].mean()),
                            "cx": float(xx[inside].mean()),
                        }
                    )
            text = batch["text"][b]
            records.append(
                {
                    "id": batch["id"][b],
                    "case": batch["case"][b],
                    "z": int(batch["z"][b]),
                    "text": text,
                    "singular": expression_number(text) == "singular",
                    "presence": float(present[b]),
                    "target_area": int(targets[b].sum()),
                }
            )
            comps.append(cs)
    texts = sorted({r["text"] for r in records})
    sentence = {}
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            sentence.update(zip(chunk, model.encode_text(chunk).sentence.numpy()))
    return records, comps, sentence


def _rank(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)) / max(len(values) - 1, 1)


def features(cs: list[dict], presence: float) -> np.ndarray:
    """``(components, FEATURES)``: each component's measurements, raw and relative to the others."""
    get = {k: np.array([c[k] for c in cs]) for k in cs[0]}
    area, psum, image = get["area"], get["psum"], get["image"]
    contrast = image - get["ring"]
    cy, cx = get["cy"], get["cx"]
    n = len(cs)
    columns = [
        np.log(area), area / area.max(), _rank(area), area == area.max(), area == area.min(),
        np.log(psum), psum / psum.max(), _rank(psum), get["pmax"], psum / area,
        image, get["ring"], contrast, _rank(image), _rank(contrast),
        cy, cx, cy - cy.mean(), cx - cx.mean(), _rank(cy), _rank(cx),
        np.full(n, np.log(n)), np.full(n, presence),
    ]  # fmt: skip
    return np.stack(columns, 1).astype(np.float32)


def train_scorer(records, comps, sentence, *, epochs: int, dropout: float, seed: int, use_text: bool):
    """An MLP on ``[features, sentence]`` -> logit that the component lies on the target."""
    import torch

    x, t, y = [], [], []
    for r, cs in zip(records, comps):
        if len(cs) < 2 or not r["target_area"]:
            continue
        x.append(features(cs, r["presence"]))
        t.append(np.repeat(sentence[r["text"]][None], len(cs), 0))
        y.append([c["inter"] / c["area"] >= 0.5 for c in cs])
    x, t, y = np.concatenate(x), np.concatenate(t), np.concatenate(y).astype(np.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(FEATURES + t.shape[1], 128), torch.nn.ReLU(), torch.nn.Dropout(dropout),
        torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    inputs = torch.tensor(np.concatenate([(x - mean) / std, t * float(use_text)], 1))
    labels = torch.tensor(y)
    net.train()
    for _ in range(epochs):
        for chunk in torch.randperm(len(inputs)).split(256):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(inputs[chunk])[:, 0], labels[chunk]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()

    def score(cs, presence, embedding):
        f = np.concatenate(
            [(features(cs, presence) - mean) / std, np.repeat(embedding[None], len(cs), 0) * float(use_text)],
            1,
        )
        with torch.no_grad():
            return torch.sigmoid(net(torch.tensor(f))[:, 0]).numpy()

    return score, len(x), int(sum(len(cs) >= 2 and r["target_area"] > 0 for r, cs in zip(records, comps)))


def choose(records, comps, rule) -> list[dict]:
    """Per-pair records (``paired_delta``'s keys) of the answers ``rule(record, comps) -> kept`` gives."""
    out = []
    for r, cs in zip(records, comps):
        keep = rule(r, cs) if len(cs) >= 2 else range(len(cs))
        inter = sum(cs[j]["inter"] for j in keep)
        area = sum(cs[j]["area"] for j in keep)
        out.append({**r, "intersection": inter, "union": r["target_area"] + area - inter, "pred_area": area})
    return out


def main(argv: list[str] | None = None) -> int:
    from lsms_core.cli import add_scales_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--train-split", default="train")
    parser.add_argument(
        "--train-items", type=int, default=10000, help="training pairs, evenly spaced (0 = all)"
    )
    parser.add_argument("--eval", nargs="+", required=True, help="DATA:SPLIT:MAX_ITEMS (0 = all pairs)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    add_scales_argument(parser)
    args = parser.parse_args(argv)

    from lsms_core.checkpoint import default_model_path, load_model
    from lsms_core.evaluate import paired_delta
    from lsms_core.model import check_scales

    scales = check_scales(tuple(args.scales))
    model = load_model(args.model or default_model_path())
    start = time.perf_counter()
    train = components(model, args.train_data, args.train_split, args.train_items or None, scales)
    print(
        f"{args.train_data} {args.train_split}: {len(train[0])} pairs answered in {time.perf_counter() - start:.0f} s"
    )
    scorers = {}
    for name, use_text in (("learned", True), ("learned, no text", False)):
        scorers[name], n_comp, n_pairs = train_scorer(
            *train, epochs=args.epochs, dropout=args.dropout, seed=args.seed, use_text=use_text
        )
    print(f"scorers trained on {n_comp} components of {n_pairs} positive answers with two or more")

    def learned(name):
        def rule(r, cs):
            s = scorers[name](cs, r["presence"], r["embedding"])
            best = [int(s.argmax())]
            return best if r["singular"] else ([j for j in range(len(cs)) if s[j] > 0.5] or best)

        return rule

    rules = {
        "raw": lambda r, cs: range(len(cs)),
        "sum rule": lambda r, cs: (
            [int(np.argmax([c["psum"] for c in cs]))] if r["singular"] else range(len(cs))
        ),
        "learned": learned("learned"),
        "learned, no text": learned("learned, no text"),
        "oracle (reads the truth)": lambda r, cs: (
            [j for j, c in enumerate(cs) if c["inter"] > 0] if r["target_area"] else range(len(cs))
        ),
    }
    for spec in args.eval:
        data, split, items = spec.rsplit(":", 2)
        start = time.perf_counter()
        records, comps, sentence = components(model, data, split, int(items) or None, scales)
        records = [{**r, "embedding": sentence[r["text"]]} for r in records]
        several = sum(len(cs) >= 2 and r["target_area"] > 0 for r, cs in zip(records, comps))
        print(
            f"\n{data} {split}: {len(records)} pairs ({several} positive answers with two or more components),"
            f" answered in {time.perf_counter() - start:.0f} s"
        )
        scored = {name: choose(records, comps, rule) for name, rule in rules.items()}
        rows = []
        for name, recs in scored.items():
            positives = [p["intersection"] / p["union"] for p in recs if p["target_area"]]
            d = paired_delta(scored["raw"], recs)
            rows.append(
                [
                    name,
                    str(len(positives)),
                    f"{np.mean(positives):.3f}",
                    f"{d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]",
                ]
            )
        print_markdown_table(["answer", "positive pairs", "mIoU", "Δ mIoU [95 %]"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
