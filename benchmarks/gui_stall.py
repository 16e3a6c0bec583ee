"""Does segmenting freeze napari? Measure the GUI event loop's longest stall during a run.

A 10 ms QTimer records when it fires while the segment widget runs a segmentation in its worker
thread; the longest gap between ticks is how long the GUI was unresponsive. Target: < 200 ms.
Two runs are measured: "first" (without --preload the worker first loads the model: imports,
weights) and "second" (the model is cached, only inference). With ``--preload`` the model is
loaded by ``SegmentWidget.preload()`` before the measured runs, as the ``napari-lsms`` main job
does when it opens the window.

    xvfb-run -a python benchmarks/gui_stall.py                  # the sample CT, the default model
    xvfb-run -a python benchmarks/gui_stall.py --preload        # as the main job: model preloaded
    xvfb-run -a python benchmarks/gui_stall.py --synthetic 48   # a 48 x 256 x 256 synthetic CT

Without the shipped default model (or ``--model``), a model with the default configuration and
random weights is built (the cost of inference does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_MS = 200.0
TICK_MS = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file (default: the shipped default model)")
    parser.add_argument("--synthetic", type=int, metavar="SLICES", help="use a synthetic CT of SLICES x 256 x 256")
    parser.add_argument("--text", default="the largest lesion in the right lobe of the liver")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--with-truth",
        action="store_true",
        help="also open the sample's truth labels (hidden), as the napari-lsms main job does",
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        help="load the model with SegmentWidget.preload() first, as the napari-lsms main job does",
    )
    return parser.parse_args(argv)


def synthetic_ct(slices: int):
    """An abdomen-like volume: a soft-tissue ellipse in air with a darker blob."""
    from lsms_core.io import Volume

    z, y, x = np.ogrid[0:slices, 0:256, 0:256]
    array = np.full((slices, 256, 256), -1000, dtype=np.int16)
    array[np.broadcast_to(((y - 128) / 100) ** 2 + ((x - 128) / 120) ** 2 < 1, array.shape)] = 50
    array[np.broadcast_to((y - 110) ** 2 + (x - 90) ** 2 < 200, array.shape) & (z > slices // 3)] = 0
    return Volume(array, spacing=(1.5, 1.5, 3.0))


def resolve_model(path: Path | None, workdir: Path) -> Path:
    from lsms_core.checkpoint import default_model_path, save_model

    if path is not None:
        return path
    if default_model_path().is_file():
        return default_model_path()
    from lsms_core.model import LSMS, LSMSConfig

    print("no default model shipped: building a default-config model with random weights")
    return save_model(LSMS(LSMSConfig()), workdir / "random_default.safetensors", version="random")


def measure(app, widget) -> dict:
    """Start a segmentation and tick a 10 ms timer until it ends; return the tick statistics."""
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    start = time.perf_counter()
    ticks.append(start)
    worker = widget.segment()
    click_ms = (time.perf_counter() - start) * 1000.0
    if worker is None:
        raise SystemExit("the widget refused to segment; see the notification above")
    while widget.is_running:
        app.processEvents()
        time.sleep(0.001)
    end = time.perf_counter()
    ticks.append(end)
    timer.stop()
    gaps = np.diff(ticks) * 1000.0
    worst = int(np.argmax(gaps))
    return {
        "run_s": end - start,
        "click_ms": click_ms,
        "ticks": len(ticks),
        "max_ms": float(gaps[worst]),
        "max_at_s": ticks[worst] - start,
        "p99_ms": float(np.percentile(gaps, 99)),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="lsms_gui_stall_"))
    os.environ.setdefault("LSMS_HOME", str(workdir))  # keep recent descriptions out of ~/.lsms

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_lsms._reader import ct_image_kwargs
    from napari_lsms._widget import SegmentWidget

    model = resolve_model(args.model, workdir)
    viewer = napari.Viewer(show=False)
    if args.synthetic:
        volume = synthetic_ct(args.synthetic)
        viewer.add_image(volume.array, **ct_image_kwargs(volume, name="synthetic CT"))
    else:
        from napari_lsms._sample_data import sample_ct

        (data, kwargs, _), truth = sample_ct()[:2]
        viewer.add_image(data, **kwargs)
        if args.with_truth:  # as the main job opens it: the truth labels, hidden
            viewer.add_labels(truth[0], **{**truth[1], "visible": False})
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    if not widget.select_model(model):
        widget.model_combo.addItem(model.name, str(model.resolve()))
        widget.model_combo.setCurrentIndex(widget.model_combo.count() - 1)
    widget.device_combo.setCurrentText(args.device)
    widget.set_description(args.text)
    app = QApplication.instance()

    shape = viewer.layers[widget.image_combo.currentText()].data.shape
    print(f"image {shape}, model {model}, device {args.device}, timer {TICK_MS} ms")
    if args.preload:
        started = time.perf_counter()
        if widget.preload() is None:
            raise SystemExit("no model selected: nothing to preload")
        while len(widget.segmenters) == 0 and time.perf_counter() - started < 120:
            app.processEvents()
            time.sleep(0.001)
        print(f"preloaded the model in {time.perf_counter() - started:.2f} s (before the measured runs)")
    ok = True
    for name in ("first", "second"):
        stats = measure(app, widget)
        ok &= stats["max_ms"] < TARGET_MS
        print(
            f"{name:>4}: run {stats['run_s']:.2f} s, {stats['ticks']} ticks, "
            f"max stall {stats['max_ms']:.0f} ms (at {stats['max_at_s']:.2f} s), p99 {stats['p99_ms']:.0f} ms, "
            f"Segment click itself {stats['click_ms']:.0f} ms"
        )
    print(f"target max stall < {TARGET_MS:.0f} ms: {'met' if ok else 'NOT met'}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
