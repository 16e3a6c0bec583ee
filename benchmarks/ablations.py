"""Train the full LSMS and each ablation with the same budget, then compare them side by side.

    python benchmarks/ablations.py --data data/bench240 --out runs/ablations240 \
        --config benchmarks/default_model.json --max-steps 1200

Variants (one switch each, everything else identical: data, seed, steps, batch, learning rate):

- ``full``              the default LSMS configuration
- ``no_scale_branch``   SVLA without the scale-aware (multi-kernel) visual branch
- ``no_language_branch`` SVLA without pixel-word cross-attention (text only via FiLM/presence)
- ``unet_decoder``      a plain U-Net decoder instead of the Full-Scale Decoder
- ``no_contrastive``    no vision-language contrastive loss term
- ``blank_text``        every expression replaced by the same words, in training and test

Each variant trains with :class:`lsms_core.train.Trainer` into ``OUT/VARIANT`` (re-running resumes
or skips finished runs) and is scored on the test split with :func:`lsms_core.evaluate.evaluate_model`.
The table is printed and written to ``OUT/ablations.json``.

The recipe is ``--config``'s ``"train"`` block (as ``lsms train --config`` reads it, early stopping
included), so without step flags the variants get the full model's whole budget::

    python benchmarks/ablations.py --data data/bench240 --out runs/ablations_full \
        --config benchmarks/default_model.json

``--max-steps``, ``--batch-size``, ``--lr``, ``--seed`` and ``--val-max-items`` override it; a short
budget given with ``--max-steps`` and no ``"train"`` block trains without early stopping. A run
folder trained by ``lsms train`` with the same config plus the variant's switch can be placed at
``OUT/VARIANT``: it is resumed, or scored as it is when finished. ``train s`` is the run's own
training time (summed over resumes).

Each variant's test report, with every pair's counts, is kept in ``OUT/VARIANT/test_report.json``
(reused while the model is the same), and the last column is its mIoU minus the full model's on
the same pairs, with a 95 % interval from a bootstrap over test cases. Variants may be run in
separate invocations (``--variants``): rows with the same data and recipe share the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "full": {},
    "no_scale_branch": {"use_scale_branch": False},
    "no_language_branch": {"use_language_branch": False},
    "unet_decoder": {"decoder": "unet"},
    "no_contrastive": {"contrastive_weight": 0.0},
    "blank_text": {},
}
BLANK_TEXT = "the liver lesion"
#: The recipe when --config has no "train" block (flags still override it).
SHORT_BUDGET = {
    "max_steps": 400,
    "batch_size": 8,
    "lr": 1e-3,
    "seed": 0,
    "val_max_items": 256,
    "patience": 10**6,
}
#: Each run's test-split report (with per-pair records), in OUT/VARIANT.
TEST_REPORT = "test_report.json"
#: Arguments that must match for results of separate invocations to share one table.
RUN_KEYS = ("data", "image_size", "in_slices", "recipe")
#: (metric key, column title)
COLUMNS = (
    ("mIoU", "mIoU"),
    ("oIoU", "oIoU"),
    ("dice", "Dice"),
    ("P@0.5", "P@0.5"),
    ("P@0.7", "P@0.7"),
    ("P@0.9", "P@0.9"),
    ("negative_accuracy", "neg. empty"),
)


def blank_text_dataset(data: Path, out: Path) -> Path:
    """A copy of ``data`` whose expressions all read ``BLANK_TEXT`` (cases are linked, not copied)."""
    target = out / "blank_text_data"
    if (target / "expressions.jsonl").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "splits.json"):
        shutil.copy2(data / name, target / name)
    if not (target / "cases").exists():
        (target / "cases").symlink_to((data / "cases").resolve(), target_is_directory=True)
    lines = []
    for line in (data / "expressions.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["expression"] = BLANK_TEXT
            lines.append(json.dumps(record))
    (target / "expressions.jsonl").write_text("\n".join(lines) + "\n")
    return target


def full_model_fields(args: argparse.Namespace) -> dict:
    """The full model's LSMSConfig fields: --config's "model" block, then --image-size/--in-slices."""
    base = json.loads(Path(args.config).read_text()).get("model", {}) if args.config else {}
    overrides = {k: v for k, v in (("image_size", args.image_size), ("in_slices", args.in_slices)) if v}
    return {**base, **overrides}


def recipe(args: argparse.Namespace) -> dict:
    """TrainConfig fields shared by every variant: --config's "train" block, then the given flags.

    Without a "train" block :data:`SHORT_BUDGET` applies (400 steps, no early stopping).
    """
    base = json.loads(Path(args.config).read_text()).get("train") if args.config else None
    fields = dict(base) if base else dict(SHORT_BUDGET)
    flags = ("max_steps", "batch_size", "lr", "seed", "val_max_items")
    fields.update({flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None})
    fields.setdefault("checkpoint_every_steps", 100)
    return fields


def saved_rows(results_path: Path, args: argparse.Namespace) -> list[dict]:
    """The rows of ``results_path`` when it was written with the same data and recipe, else []."""
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    same = {k: saved.get("args", {}).get(k) for k in RUN_KEYS} == {k: vars(args)[k] for k in RUN_KEYS}
    return saved.get("rows", []) if same else []


def run_variant(name: str, args: argparse.Namespace) -> dict:
    from lsms_core.model import LSMSConfig
    from lsms_core.train import TrainConfig, Trainer

    data = Path(args.data)
    if name == "blank_text":
        data = blank_text_dataset(data, Path(args.out))
    model_config = LSMSConfig.from_dict({**full_model_fields(args), **VARIANTS[name]})
    train_config = TrainConfig.from_dict(recipe(args))
    run = Path(args.out) / name
    summary = Trainer(model_config, train_config, data, run).fit()
    report = test_report(run, summary["model_path"], data)
    return {
        "variant": name,
        "train_s": round(float(summary.get("elapsed_s") or 0.0), 1),
        "steps": summary.get("step"),
        "best_step": summary.get("best_step"),
        **report["overall"],
    }


def test_report(run: Path, model_path: str, data: Path) -> dict:
    """The test-split report of the run's best model, with per-pair records; kept in
    ``run/test_report.json`` and reused while the model's version is the same."""
    from lsms_core.checkpoint import read_model_card
    from lsms_core.evaluate import evaluate_path

    path = run / TEST_REPORT
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("model_version") == read_model_card(model_path).get("version"):
            return saved
    return evaluate_path(model_path, data, "test", json_out=path, per_pair=True, scales=(1.0,))


def title(run_args: dict) -> str:
    """The table's first line, from the saved arguments (older files hold the recipe flags directly)."""
    r = run_args.get("recipe") or run_args
    patience = r.get("patience", 10**6)
    stopping = "" if patience is None or patience >= 10**6 else f", patience {patience} validations"
    return (
        f"Ablations on {run_args['data']} (test split, 2D slices), up to {r['max_steps']} steps x batch "
        f"{r['batch_size']}, lr {r.get('lr')}{stopping}, image {run_args['image_size']}, "
        f"in_slices {run_args.get('in_slices', 1)}, seed {r['seed']}"
    )


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'variant':<20}"
        + "".join(f"{title:>11}" for _, title in COLUMNS)
        + f"{'steps':>7}{'best':>7}{'train s':>9}  mIoU - full [95% CI over cases]"
        + "  neg. empty - full [95% CI]"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = "".join(
            f"{row.get(key):>11.3f}" if isinstance(row.get(key), (int, float)) else f"{'-':>11}"
            for key, _ in COLUMNS
        )
        best = row.get("best_step") or "-"  # the step of the scored (best-validation) model
        deltas = "".join(
            f"  {d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            for d in (row.get("vs_full"), row.get("vs_full_empty"))
            if d
        )
        print(
            f"{row['variant']:<20}{cells}{row.get('steps', 0):>7}{best:>7}{row.get('train_s', 0):>9.0f}{deltas}"
        )
    matched = [r for r in rows if r.get("at_full_empty")]
    if matched:
        print(
            "\nAt the full model's neg. empty (presence threshold raised until as many negatives are empty):"
        )
        for r in matched:
            m = r["at_full_empty"]
            t = "0.5 (unchanged)" if m["threshold"] is None else f"{m['threshold']:.3f}"
            d = m["vs_full"]
            print(
                f"{r['variant']:<20} mIoU {m['mIoU']:.3f}  minus full {d['delta']:+.3f} "
                f"[{d['lo']:+.3f}, {d['hi']:+.3f}]  presence threshold {t}"
            )


def miou_at_negatives_empty(pairs: list[dict], target: float) -> dict:
    """mIoU when the presence threshold is raised (from the 0.5 every figure uses) until at least
    ``target`` of the negative pairs are answered empty: the variants compared at the full model's
    operating point, not at a trade-off of their own. ``threshold`` is None when 0.5 already gets
    there; a threshold can only be raised, since a vetoed answer's mask is not in the report.
    ``pairs`` are the pairs as scored there (:func:`vetoed`)."""
    import numpy as np

    # Only a negative's presence changes how many negatives are empty, so the candidates are those;
    # every answer in a report is above the 0.5 gate, so the highest one empties them all.
    negatives = [p for p in pairs if not p["target_area"]]
    answered = sorted({p["presence"] for p in negatives if p["presence"] > 0.5 and p["pred_area"]})
    for t in [None, *answered]:
        gated = negatives if t is None else [vetoed(p, t) for p in negatives]
        if np.mean([not p["pred_area"] for p in gated]) >= target:
            break
    gated = pairs if t is None else [vetoed(p, t) for p in pairs]
    ious = [p["intersection"] / p["union"] for p in gated if p["target_area"]]
    return {"threshold": None if t is None else float(t), "mIoU": float(np.mean(ious)), "pairs": gated}


def vetoed(pair: dict, threshold: float) -> dict:
    """``pair`` as scored with the presence threshold raised to ``threshold``: an empty answer at or
    below it."""
    if pair["presence"] > threshold or not pair["pred_area"]:
        return pair
    return {**pair, "intersection": 0, "pred_area": 0, "union": pair["target_area"]}


def add_deltas(rows: list[dict], out: Path) -> None:
    """Each variant's mIoU and neg. empty minus the full model's (``vs_full``, ``vs_full_empty``),
    from the saved test reports, when the full model's report is there."""
    import numpy as np

    from lsms_core.evaluate import paired_delta

    full_report = out / "full" / TEST_REPORT
    if not full_report.is_file():
        return
    full_pairs = json.loads(full_report.read_text())["pairs"]
    full_empty = float(np.mean([p["pred_area"] == 0 for p in full_pairs if not p["target_area"]]))
    for r in rows:
        report = out / r["variant"] / TEST_REPORT
        if r["variant"] != "full" and report.is_file():
            pairs = json.loads(report.read_text())["pairs"]
            r["vs_full"] = paired_delta(full_pairs, pairs)
            r["vs_full_empty"] = paired_delta(full_pairs, pairs, score="empty")
            matched = miou_at_negatives_empty(pairs, full_empty)
            gated = matched.pop("pairs")  # the same pairs with the answers the raised gate vetoes
            r["at_full_empty"] = {**matched, "vs_full": paired_delta(full_pairs, gated)}


def print_by_slice_content(rows: list[dict], out: Path, data: str) -> None:
    """Each variant's mIoU on the positive pairs whose slice shows only the target(s), and on those
    where another lesion is on the slice too."""
    import numpy as np

    from lsms_core.data.dataset import ReferringDataset, other_lesion_on_slice

    dataset = ReferringDataset(data)
    targets = {r["id"]: list(r.get("targets") or []) for r in dataset.expressions()}
    lesions: dict[str, dict] = {}
    print("\nmIoU by what else the slice shows (positive pairs):")
    for r in rows:
        report = out / r["variant"] / TEST_REPORT
        if not report.is_file():
            continue
        groups: dict[bool, list[float]] = {False: [], True: []}
        for p in json.loads(report.read_text())["pairs"]:
            if p["target_area"]:
                if p["case"] not in lesions:
                    lesions[p["case"]] = dataset.case_info(p["case"])["lesions"]
                crowded = other_lesion_on_slice(p["z"], targets[p["id"]], lesions[p["case"]])
                groups[crowded].append(p["intersection"] / p["union"])
        print(
            f"{r['variant']:<20} only the target(s) {np.mean(groups[False]):.3f} (n={len(groups[False])})  "
            f"another lesion too {np.mean(groups[True]):.3f} (n={len(groups[True])})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset folder (lsms data synth ...)")
    parser.add_argument("--out", required=True, help="output folder for the runs and ablations.json")
    parser.add_argument("--config", default=None, help="JSON whose 'model' block is the full model's config")
    parser.add_argument("--max-steps", type=int, default=None, help="default: --config's, else 400")
    parser.add_argument("--batch-size", type=int, default=None, help="default: --config's, else 8")
    parser.add_argument("--lr", type=float, default=None, help="default: --config's, else 1e-3")
    parser.add_argument("--image-size", type=int, default=None, help="default: --config's, else 256")
    parser.add_argument("--in-slices", type=int, default=None, help="default: --config's, else 1")
    parser.add_argument("--seed", type=int, default=None, help="default: --config's, else 0")
    parser.add_argument("--val-max-items", type=int, default=None, help="default: --config's, else 256")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--table-only", action="store_true", help="print the table of OUT/ablations.json")
    args = parser.parse_args(argv)

    results_path = Path(args.out) / "ablations.json"
    if args.table_only:
        saved = json.loads(results_path.read_text())
        add_deltas(saved["rows"], Path(args.out))  # also for rows saved before a column existed
        print(title(saved["args"]))
        print_table(saved["rows"])
        print_by_slice_content(saved["rows"], Path(args.out), args.data)
        return 0

    from lsms_core.model import LSMSConfig

    resolved = LSMSConfig.from_dict(full_model_fields(args))
    args.image_size, args.in_slices = resolved.image_size, resolved.in_slices  # as run and printed
    args.recipe = recipe(args)

    ordered = saved_rows(results_path, args)
    for name in args.variants:
        print(f"== {name}", file=sys.stderr, flush=True)
        row = run_variant(name, args)
        # Re-read before writing: rows of other invocations with the same data and recipe are kept.
        rows = {r["variant"]: r for r in saved_rows(results_path, args)} | {name: row}
        ordered = [rows[v] for v in VARIANTS if v in rows]
        if "full" in rows:
            add_deltas(ordered, Path(args.out))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"args": vars(args), "rows": ordered}, indent=2) + "\n")
    print(title(vars(args)))
    print_table(ordered)
    print_by_slice_content(ordered, Path(args.out), args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
