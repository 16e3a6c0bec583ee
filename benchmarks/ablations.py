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
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
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


def run_variant(name: str, args: argparse.Namespace) -> dict:
    from lsms_core.checkpoint import load_model
    from lsms_core.evaluate import evaluate_model
    from lsms_core.model import LSMSConfig
    from lsms_core.train import TrainConfig, Trainer

    data = Path(args.data)
    if name == "blank_text":
        data = blank_text_dataset(data, Path(args.out))
    model_config = LSMSConfig.from_dict({**full_model_fields(args), **VARIANTS[name]})
    train_config = TrainConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_max_items=args.val_max_items,
        patience=10**6,  # same budget for every variant: no early stopping
        checkpoint_every_steps=100,
    )
    out = Path(args.out) / name
    started = time.perf_counter()
    summary = Trainer(model_config, train_config, data, out).fit()
    train_s = time.perf_counter() - started
    model = load_model(summary["model_path"])
    report = evaluate_model(model, data, split="test", batch_size=16)
    return {"variant": name, "train_s": round(train_s, 1), "steps": summary.get("step"), **report["overall"]}


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'variant':<20}" + "".join(f"{title:>11}" for _, title in COLUMNS) + f"{'steps':>7}{'train s':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = "".join(
            f"{row.get(key):>11.3f}" if isinstance(row.get(key), (int, float)) else f"{'-':>11}"
            for key, _ in COLUMNS
        )
        print(f"{row['variant']:<20}{cells}{row.get('steps', 0):>7}{row.get('train_s', 0):>9.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset folder (lsms data synth ...)")
    parser.add_argument("--out", required=True, help="output folder for the runs and ablations.json")
    parser.add_argument("--config", default=None, help="JSON whose 'model' block is the full model's config")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=None, help="default: --config's, else 256")
    parser.add_argument("--in-slices", type=int, default=None, help="default: --config's, else 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-max-items", type=int, default=256)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--table-only", action="store_true", help="print the table of OUT/ablations.json")
    args = parser.parse_args(argv)

    results_path = Path(args.out) / "ablations.json"
    if args.table_only:
        saved = json.loads(results_path.read_text())
        a = saved["args"]
        print(
            f"Ablations on {a['data']} (test split, 2D slices), {a['max_steps']} steps x batch {a['batch_size']}, "
            f"image {a['image_size']}, in_slices {a.get('in_slices', 1)}, seed {a['seed']}"
        )
        print_table(saved["rows"])
        return 0

    from lsms_core.model import LSMSConfig

    resolved = LSMSConfig.from_dict(full_model_fields(args))
    args.image_size, args.in_slices = resolved.image_size, resolved.in_slices  # as run and printed

    rows = []
    for name in args.variants:
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(run_variant(name, args))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(
        f"Ablations on {args.data} (test split, 2D slices), {args.max_steps} steps x batch {args.batch_size}, "
        f"image {args.image_size}, in_slices {args.in_slices}, seed {args.seed}"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
