"""End-to-end speed of volume inference: read -> segment -> write a 512 x 512 x 100 CT.

    python benchmarks/volume_speed.py                 # shipped model, or untrained default config
    python benchmarks/volume_speed.py --runs 5 --model RUN/model.safetensors --device cpu
    python benchmarks/volume_speed.py --scales 1      # one pass instead of the default scales

Builds a synthetic CT NIfTI (air, a body ellipse of soft tissue, a liver-like region with two
hypodense lesions) in a temporary folder, then times ``read_volume`` -> ``Segmenter.segment`` ->
``write_volume`` end to end. Prints the median over ``--runs`` runs (after one warm-up run) of the
total, per volume and per slice, and the breakdown: read, canonicalise+prepare, model,
postprocess, write. Speed does not depend on the weights, so an untrained model of the default
config is used when no model is shipped (the output says which). Target: <= 10 s per volume on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lsms_core.cli import add_scales_argument


def make_ct(shape: tuple[int, int, int] = (100, 512, 512), seed: int = 0) -> np.ndarray:
    """A synthetic abdominal CT in HU: air, body ellipse (fat/muscle), a liver with two lesions."""
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    hu = np.full(shape, -1000, dtype=np.int16)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    cy, cx = height / 2, width / 2
    body = ((yy - cy) / (0.38 * height)) ** 2 + ((xx - cx) / (0.45 * width)) ** 2 <= 1
    liver = ((yy - cy * 0.9) / (0.2 * height)) ** 2 + ((xx - cx * 0.7) / (0.22 * width)) ** 2 <= 1
    lesions = [(0.85 * cy, 0.6 * cx, 0.04 * width), (1.0 * cy, 0.8 * cx, 0.025 * width)]
    for z in range(depth):
        sl = np.where(body, 40, -1000).astype(np.int16)
        if 0.2 * depth <= z <= 0.8 * depth:
            sl[liver] = 60
            for ly, lx, r in lesions:
                sl[(yy - ly) ** 2 + (xx - lx) ** 2 <= r**2] = 15
        noise = rng.normal(0, 12, (height, width)).astype(np.int16)
        hu[z] = np.where(body, sl + noise, sl)
    return hu


def load_segmenter(model: str | None, device: str, batch_size: int, scales: tuple[float, ...]):
    """``(Segmenter, description)``: the given model, the shipped one, or an untrained default."""
    from lsms_core.checkpoint import default_model_path
    from lsms_core.infer import Segmenter

    options = dict(device=device, batch_size=batch_size, scales=scales)
    if model:
        return Segmenter(model, **options), f"model {model}"
    if default_model_path().is_file():
        return Segmenter(None, **options), f"shipped model {default_model_path()}"
    from lsms_core.model import LSMS, LSMSConfig

    return (
        Segmenter(LSMS(LSMSConfig()), **options),
        "UNTRAINED model of the default LSMSConfig (no shipped model yet; speed does not depend on weights)",
    )


def run_once(segmenter, ct_path: Path, out_path: Path, text: str) -> dict[str, float]:
    from lsms_core.io import read_volume, write_volume

    t0 = time.perf_counter()
    volume = read_volume(ct_path)
    t1 = time.perf_counter()
    result = segmenter.segment(volume, text)
    t2 = time.perf_counter()
    write_volume(out_path, result.mask, like=volume)
    t3 = time.perf_counter()
    return {
        "read": t1 - t0,
        "canonicalise+prepare": result.timings["prepare"],
        "model": result.timings["model"],
        "postprocess": result.timings["postprocess"],
        "write": t3 - t2,
        "total": t3 - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model file (default: shipped model, else untrained default config)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="timed runs (after one warm-up run)")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--text", default="the largest lesion in the liver")
    add_scales_argument(parser)  # as lsms predict: the library's default scales
    args = parser.parse_args(argv)

    import torch

    from lsms_core.io import Volume, write_volume

    segmenter, which = load_segmenter(args.model, args.device, args.batch_size, tuple(args.scales))
    print(
        f"{which}\ndevice {segmenter.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
        f"scales {list(segmenter.scales)}"
    )
    config = segmenter.config
    print(f"config: image_size {config.image_size}, in_slices {config.in_slices}")

    with tempfile.TemporaryDirectory(prefix="lsms_bench_") as tmp:
        ct_path, out_path = Path(tmp) / "ct.nii.gz", Path(tmp) / "mask.nii.gz"
        hu = make_ct((args.slices, args.size, args.size))
        write_volume(ct_path, hu, like=Volume(hu, spacing=(0.8, 0.8, 2.5)))
        print(f"CT {hu.shape[::-1]} (x, y, z) written to a temporary NIfTI; warm-up run ...")
        run_once(segmenter, ct_path, out_path, args.text)
        runs = [run_once(segmenter, ct_path, out_path, args.text) for _ in range(args.runs)]

    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"median of {args.runs} runs:")
    print(f"  per volume: {median['total']:.2f} s   per slice: {1000 * median['total'] / args.slices:.1f} ms")
    for key in ("read", "canonicalise+prepare", "model", "postprocess", "write"):
        print(f"  {key:<22}{median[key]:7.2f} s")
    verdict = "meets" if median["total"] <= 10.0 else "misses"
    print(f"target <= 10 s per volume: {verdict} it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
