"""The ``lsms`` command line: train, evaluate, predict, build datasets, inspect models, open napari.

    lsms predict ct.nii.gz --text "the largest lesion in the right lobe" --out mask.nii.gz
    lsms train --data DATASET --out RUN [--preset tiny] [--epochs 20] [--json-progress]
    lsms evaluate --data DATASET --model RUN/model.safetensors --json report.json
    lsms data synth OUT --cases 20 --seed 0
    lsms data import SRC OUT --kind auto
    lsms data merge OUT BENCH EXTRA [--train-only EXTRA]
    lsms info [--model M]
    lsms gui

Heavy modules (torch, transformers, SimpleITK, napari) are imported inside the subcommands, so
``lsms --help`` is fast. User errors (bad paths, bad files, bad options) print one message on
stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lsms_core.infer import DEFAULT_SCALES

EXIT_USER_ERROR = 2


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _ProgressBar:
    """A ``progress(done, total)`` callable drawing a tqdm bar on stderr (hidden when not a TTY)."""

    def __init__(self, desc: str, unit: str):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=total, desc=self.desc, unit=self.unit, file=sys.stderr, disable=None, leave=False
            )
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parse_slices(value: str) -> tuple[int, int]:
    """``"z0:z1"`` -> ``(z0, z1)`` (argparse type)."""
    try:
        z0, z1 = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected z0:z1 (e.g. 10:60), got {value!r}") from None
    return z0, z1


def _read_json_file(path: str, what: str) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {p}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {p}: expected a JSON object")
    return data


def _model_path(value: str | None) -> Path:
    from lsms_core.checkpoint import default_model_path

    return Path(value) if value else default_model_path()


# --------------------------------------------------------------------------------------------
# lsms train
# --------------------------------------------------------------------------------------------

#: ``--flag`` -> LSMSConfig / TrainConfig field, applied over the preset and ``--config``.
_MODEL_FLAGS = {
    "image_size": "image_size",
    "in_slices": "in_slices",
    "text_encoder": "text_encoder",
    "text_trainable": "text_trainable",
}
_TRAIN_FLAGS = {
    "epochs": "epochs",
    "max_steps": "max_steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "seed": "seed",
    "device": "device",
}


def _preset(name: str) -> dict:
    """LSMSConfig fields of a preset: ``default`` (the paper-sized model) or ``tiny`` (CPU smoke runs)."""
    from lsms_core.model import LSMSConfig

    if name == "default":
        return LSMSConfig().to_dict()
    from lsms_core.testing import tiny_config

    return {**tiny_config("").to_dict(), "text_encoder": None}


def build_train_configs(args: argparse.Namespace):
    """``(LSMSConfig | None, TrainConfig)`` from the preset, ``--config`` JSON and explicit flags.

    ``--config`` holds ``{"model": {LSMSConfig fields}, "train": {TrainConfig fields}}`` (both
    optional). With ``--init-from`` and no ``--preset``, the saved model's config is the base, so
    only explicitly given options change it.
    """
    from lsms_core.model import LSMSConfig
    from lsms_core.train import TrainConfig

    spec = _read_json_file(args.config, "--config") if args.config else {}
    unknown = set(spec) - {"model", "train"}
    if unknown:
        raise ValueError(
            f'--config {args.config}: unknown keys {sorted(unknown)}; expected {{"model": {{...}}, "train": {{...}}}}'
        )

    saved = None
    if args.init_from:
        from lsms_core.checkpoint import read_model_card

        saved = dict(read_model_card(args.init_from)["config"])
    model = dict(saved) if saved is not None and not args.preset else _preset(args.preset or "default")
    model.update(spec.get("model", {}))
    model.update(
        {
            field: getattr(args, flag)
            for flag, field in _MODEL_FLAGS.items()
            if getattr(args, flag) is not None
        }
    )
    if saved is not None:
        _check_fine_tune_config(LSMSConfig.from_dict(model), LSMSConfig.from_dict(saved), args.init_from)

    train = dict(spec.get("train", {}))
    train.update(
        {
            field: getattr(args, flag)
            for flag, field in _TRAIN_FLAGS.items()
            if getattr(args, flag) is not None
        }
    )
    return LSMSConfig.from_dict(model), TrainConfig.from_dict(train)


def _check_fine_tune_config(requested, saved, init_from: str) -> None:
    """Refuse options that would change a fine-tuned model's architecture or inputs.

    With ``--init-from`` the Trainer keeps the saved model's config except the training fields and
    the modules it may switch on (:func:`lsms_core.train.merge_fine_tune_config`); anything else the
    options ask for would be dropped in silence, so it is an error here.
    """
    from lsms_core.train import merge_fine_tune_config

    wanted, kept = requested.to_dict(), saved.to_dict()
    _, dropped = merge_fine_tune_config(kept, wanted)
    if dropped:
        conflicts = "; ".join(f"{k}={wanted[k]!r} (the model has {kept[k]!r})" for k in dropped)
        raise ValueError(
            f"--init-from {init_from}: fine-tuning keeps the model's architecture and inputs, so "
            f"{conflicts} cannot be applied. Drop those options (and --preset, whose sizes are for "
            "new models), or train a new model without --init-from"
        )


def _train_reporter(json_progress: bool) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """``(callback, close)``: JSON lines on stdout, or a tqdm bar (+ validation lines) on stderr."""
    if json_progress:

        def emit(event: dict) -> None:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

        return emit, lambda: None

    from tqdm import tqdm

    bar = None  # drawn at the first event: an error before training starts is then the only line

    def show(event: dict) -> None:
        nonlocal bar
        if bar is None:  # a resumed run starts counting at its step, so its rate and ETA are real
            start = event.get("step", 0)
            bar = tqdm(desc="training", unit="step", file=sys.stderr, dynamic_ncols=True, initial=start)
        kind = event.get("event")
        if event.get("total_steps"):
            bar.total = event["total_steps"]
        if kind == "step":
            bar.set_postfix(loss=f"{event.get('loss', float('nan')):.4f}", refresh=False)
            bar.update(event.get("step", bar.n) - bar.n)
        elif kind == "validation":
            metrics = (event.get("metrics") or {}).get("overall") or {}
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
            bar.write(f"step {event.get('step')}: validation {shown}", file=sys.stderr)
        elif kind == "start" and event.get("resumed"):
            bar.write(f"resuming at step {event.get('step')}", file=sys.stderr)

    def close() -> None:
        if bar is not None:
            bar.close()

    return show, close


def cmd_train(args: argparse.Namespace) -> int:
    from lsms_core.train import Trainer

    model_config, train_config = build_train_configs(args)
    callback, close = _train_reporter(args.json_progress)
    try:
        trainer = Trainer(
            model_config, train_config, args.data, args.out, callback=callback, init_from=args.init_from
        )
        summary = trainer.fit()
    finally:
        close()
    lines = [
        f"training {summary.get('reason')} at step {summary.get('step')}",
        f"best {train_config.monitor}: {summary.get('best_metric')} (step {summary.get('best_step')})",
        f"model: {summary.get('model_path')}",
    ]
    print("\n".join(lines), file=sys.stderr if args.json_progress else sys.stdout)
    return 0


# --------------------------------------------------------------------------------------------
# lsms evaluate
# --------------------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lsms_core.evaluate import evaluate_path

    bar = _ProgressBar("evaluating", "expression" if args.level == "volume" else "pair")
    try:
        report = evaluate_path(
            _model_path(args.model),
            args.data,
            args.split,
            args.json,
            device=args.device,
            batch_size=args.batch_size,
            max_items=args.max_items,
            progress=bar,
            level=args.level,
            scales=tuple(args.scales),
        )
    finally:
        bar.close()
    overall = report.get("overall", {})
    print(
        f"{args.split}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in overall.items() if isinstance(v, (int, float)))
    )
    if args.json:
        print(f"report: {args.json}")
    return 0


# --------------------------------------------------------------------------------------------
# lsms predict
# --------------------------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from lsms_core.infer import Segmenter
    from lsms_core.io import check_output_path, read_volume, write_volume

    check_output_path(args.out)  # bad input fails before the model loads or a slice is segmented
    t0 = time.perf_counter()
    volume = read_volume(args.image)
    segmenter = Segmenter(
        args.model, device=args.device, batch_size=args.batch_size, scales=tuple(args.scales)
    )
    bar = _ProgressBar("segmenting", "slice")
    try:
        result = segmenter.segment(volume, args.text, slices=args.slices, progress=bar)
    finally:
        bar.close()
    write_volume(args.out, result.mask, like=volume)
    elapsed = time.perf_counter() - t0

    ml = result.voxels * float(np.prod(volume.spacing)) / 1000.0
    status = "found" if result.found else "not found (the mask is empty)"
    print(f"{args.text!r}: {status}")
    print(f"voxels: {result.voxels}  volume: {ml:.2f} ml  elapsed: {elapsed:.1f} s")
    print(f"mask: {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# lsms data
# --------------------------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    from lsms_core.data.synth import synthesize

    bar = _ProgressBar("synthesizing", "case")
    try:
        out = synthesize(
            args.out,
            cases=args.cases,
            seed=args.seed,
            cache_dir=args.cache_dir,
            phantom_fraction=args.phantom_fraction,
            progress=bar,
        )
    finally:
        bar.close()
    print(f"dataset: {out}")
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from lsms_core.data.importers import import_dataset

    bar = _ProgressBar("importing", "case")
    try:
        out = import_dataset(args.src, args.out, kind=args.kind, seed=args.seed, progress=bar)
    finally:
        bar.close()
    print(f"dataset: {out}")
    return 0


def cmd_data_merge(args: argparse.Namespace) -> int:
    from lsms_core.data.dataset import ReferringDataset
    from lsms_core.data.merge import merge_datasets

    out = merge_datasets(args.out, args.sources, train_only=args.train_only or ())
    merged = ReferringDataset(out)
    counts = ", ".join(f"{split} {len(cases)}" for split, cases in merged.splits.items())
    print(f"dataset: {out} ({len(merged.cases)} cases: {counts}; {len(merged.expressions())} expressions)")
    return 0


# --------------------------------------------------------------------------------------------
# lsms info
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Installed versions (None = not installed), read from metadata: nothing is imported."""
    from importlib import metadata

    from lsms_core import __version__

    versions: dict[str, str | None] = {"lsms_core": __version__}
    for dist in ("torch", "transformers", "safetensors", "SimpleITK", "numpy", "napari"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def format_model_card(path: Path, card: dict) -> list[str]:
    """Human-readable lines of a model card (config summary, metrics, provenance)."""
    config = card.get("config", {})
    keys = (
        "in_slices",
        "image_size",
        "hu_window",
        "text_encoder",
        "text_trainable",
        "embed_dims",
        "depths",
        "decoder",
    )
    lines = [
        f"model: {path}",
        f"  version: {card.get('version')}   created: {card.get('created')}",
        f"  code: {card.get('code_version')}   text encoder weights included: {card.get('includes_text_encoder')}",
        "  config: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config),
    ]
    metrics = card.get("metrics") or {}
    if metrics:
        lines.append(
            "  metrics: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        )
    else:
        lines.append("  metrics: (none recorded)")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    from lsms_core.checkpoint import list_models, models_home, read_model_card
    from lsms_core.infer import available_devices

    lines = [f"{name}: {version or 'not installed'}" for name, version in package_versions().items()]
    lines.append(f"devices: {', '.join(available_devices())}")
    scales = ", ".join(f"{scale:g}" for scale in DEFAULT_SCALES)
    lines.append(f"inference scales (lsms predict|evaluate, the plugin): {scales}; --scales 1 for one pass")
    path = _model_path(args.model)
    if args.model or path.is_file():
        lines += format_model_card(path, read_model_card(path))
    else:
        lines.append(f"model: no default model installed ({path}); train one with `lsms train`")
    entries = list_models()
    lines.append(f"models in {models_home() / 'models'}: {len([e for e in entries if not e.is_default])}")
    lines += [f"  {e.label}{'  [default]' if e.is_default else ''}: {e.path}" for e in entries]
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------
# lsms gui
# --------------------------------------------------------------------------------------------


def cmd_gui(args: argparse.Namespace) -> int:
    from napari_lsms._main import main as gui_main

    return int(gui_main(args.napari_args) or 0)


# --------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------


def add_scales_argument(parser: argparse.ArgumentParser) -> None:
    """``--scales`` (:meth:`LSMS.predict`'s ``scales``, default :data:`~lsms_core.infer.DEFAULT_SCALES`) of
    ``lsms evaluate``, ``lsms predict`` and the benchmarks that run the default inference."""
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(DEFAULT_SCALES),
        metavar="S",
        help="input scales whose probabilities are averaged per slice; the extra ones run only on "
        "slices not confidently empty (default: %(default)s; 1 = one pass, about 1.75x faster)",
    )


def build_parser() -> argparse.ArgumentParser:
    from lsms_core import __version__

    parser = argparse.ArgumentParser(
        prog="lsms",
        description="LSMS: describe a liver lesion in words, get its 3D mask in CT.",
    )
    parser.add_argument("--version", action="version", version=f"lsms {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train or fine-tune a model on a dataset folder")
    p.add_argument("--data", required=True, help="dataset folder (lsms data synth / import)")
    p.add_argument(
        "--out", required=True, help="run folder; OUT/model.safetensors is the best model; reuse to resume"
    )
    p.add_argument("--init-from", help="model to fine-tune (NAME.safetensors)")
    p.add_argument("--config", help='JSON file {"model": {LSMSConfig fields}, "train": {TrainConfig fields}}')
    p.add_argument(
        "--preset",
        choices=("default", "tiny"),
        help="model size for a new model (default: default); with --init-from the model's own",
    )
    recipe = "(default: TrainConfig's, see docs/training.md; overrides --config)"
    p.add_argument("--epochs", type=int, help=f"passes over the training pairs {recipe}")
    p.add_argument("--max-steps", type=int, help=f"stop after this many optimiser steps {recipe}")
    p.add_argument("--batch-size", type=int, help=f"pairs per step {recipe}")
    p.add_argument("--lr", type=float, help=f"peak learning rate of the visual model {recipe}")
    p.add_argument("--seed", type=int, help=f"seed of weights, sampling and augmentation {recipe}")
    p.add_argument("--device", help="auto, cuda, mps or cpu (default: auto)")
    p.add_argument("--image-size", type=int, help="model input size in pixels (default: the preset's)")
    p.add_argument(
        "--in-slices",
        type=int,
        help="adjacent slices per input, odd: 1, 3, 5... (with --init-from: only more than the model has)",
    )
    p.add_argument(
        "--text-encoder", help="local Hugging Face BERT-family folder (default: MiniLM; new models only)"
    )
    p.add_argument("--text-trainable", choices=("frozen", "last_k", "full"))
    p.add_argument("--json-progress", action="store_true", help="one JSON event per line on stdout")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="2D slice or 3D volume metrics of a model on a dataset split")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--model", help="model file (default: the shipped model)")
    p.add_argument("--split", default="test")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--level",
        choices=("slice", "volume"),
        default="slice",
        help="slice: 2D (expression, slice) pairs, the paper's protocol; volume: 3D, one Segmenter run "
        "per expression over its whole case, as `lsms predict` and the plugin answer",
    )
    p.add_argument(
        "--max-items", type=int, help="evaluate at most this many pairs (slice) or expressions (volume)"
    )
    add_scales_argument(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment what a text describes in a CT and write the mask")
    p.add_argument("image", help="CT file (.nii.gz, .nrrd, .mha, ...) or DICOM folder")
    p.add_argument("--text", required=True, help='referring expression, e.g. "the largest lesion"')
    p.add_argument("--out", required=True, help="mask file to write (same grid as the CT)")
    p.add_argument("--model", help="model file (default: the shipped model)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--slices", type=_parse_slices, help="only slices z0:z1 (z1 exclusive)")
    add_scales_argument(p)
    p.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="build datasets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("synth", help="generate the synthetic benchmark")
    p.add_argument("out", help="dataset folder to create")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="where the TotalSegmentator package is cached")
    p.add_argument(
        "--phantom-fraction",
        type=float,
        default=0.25,
        help="share of procedural phantom cases (1.0 = phantoms only: needs no TotalSegmentator download)",
    )
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("import", help="convert LiTS / MSD Task03 / nnU-Net data")
    p.add_argument("src", help="source dataset folder")
    p.add_argument("out", help="dataset folder to create")
    p.add_argument("--kind", choices=("auto", "lits", "msd", "nnunet"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_import)
    p = data.add_parser(
        "merge",
        help="merge dataset folders (the first keeps its ids; later ones get their folder name as prefix)",
    )
    p.add_argument("out", help="dataset folder to create")
    p.add_argument("sources", nargs="+", help="dataset folders to merge (two or more)")
    p.add_argument(
        "--train-only",
        nargs="+",
        metavar="SRC",
        help="sources whose cases all go to the train split (the others keep their splits)",
    )
    p.set_defaults(func=cmd_data_merge)

    p = sub.add_parser("info", help="versions, devices and the model card")
    p.add_argument("--model", help="model file (default: the shipped model)")
    p.set_defaults(func=cmd_info)

    # Every argument after "gui" (--help included) goes to napari-lsms (see main()).
    p = sub.add_parser(
        "gui", add_help=False, help="open napari with the LSMS widgets (options: lsms gui --help)"
    )
    p.set_defaults(func=cmd_gui)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``lsms`` command line; returns the exit code (2 for user errors)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "gui":
            args.napari_args = extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, --version, usage errors
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USER_ERROR
    from lsms_core.infer import DeviceOutOfMemoryError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError, DeviceOutOfMemoryError) as err:
        name = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
        print(f"lsms {name}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
