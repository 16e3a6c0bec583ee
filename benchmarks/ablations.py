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


def run_variant(name: str, args: argparse.Namespace) -> dict:
    from lsms_core.checkpoint import load_model
    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import LSMSConfig
    from lsms_core.train import TrainConfig, Trainer

    data = Path(args.data)
    if name == "blank_text":
        data = blank_text_dataset(data, Path(args.out))
    model_config = LSMSConfig.from_dict({**full_model_fields(args), **VARIANTS[name]})
    train_config = TrainConfig.from_dict(recipe(args))
    summary = Trainer(model_config, train_config, data, Path(args.out) / name).fit()
    model = load_model(summary["model_path"])
    report = evaluate_model(model, data, split="test", batch_size=16)
    return {
        "variant": name,
        "train_s": round(float(summary.get("elapsed_s") or 0.0), 1),
        "steps": summary.get("step"),
        "best_step": summary.get("best_step"),
        **report["overall"],
    }


def title(run_args: dict) -> str:
    """The table's first line, from the saved arguments (older files hold the recipe flags directly)."""
    r = run_args.get("recipe") or run_args
    stopping = "" if r.get("patience", 10**6) >= 10**6 else f", early stopping after {r['patience']} steps"
    return (
        f"Ablations on {run_args['data']} (test split, 2D slices), up to {r['max_steps']} steps x batch "
        f"{r['batch_size']}, lr {r.get('lr')}{stopping}, image {run_args['image_size']}, "
        f"in_slices {run_args.get('in_slices', 1)}, seed {r['seed']}"
    )


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'variant':<20}"
        + "".join(f"{title:>11}" for _, title in COLUMNS)
        + f"{'steps':>7}{'best':>7}{'train s':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = "".join(
            f"{row.get(key):>11.3f}" if isinstance(row.get(key), (int, float)) else f"{'-':>11}"
            for key, _ in COLUMNS
        )
        best = row.get("best_step") or "-"  # the step of the scored (best-validation) model
        print(f"{row['variant']:<20}{cells}{row.get('steps', 0):>7}{best:>7}{row.get('train_s', 0):>9.0f}")


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
        print(title(saved["args"]))
        print_table(saved["rows"])
        return 0

    from lsms_core.model import LSMSConfig

    resolved = LSMSConfig.from_dict(full_model_fields(args))
    args.image_size, args.in_slices = resolved.image_size, resolved.in_slices  # as run and printed
    args.recipe = recipe(args)

    rows = []
    for name in args.variants:
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(run_variant(name, args))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(title(vars(args)))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
