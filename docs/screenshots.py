"""Screenshots of the napari-lsms window for the docs: ``docs/images/window_*.png``.

    xvfb-run -a python docs/screenshots.py

Opens the real window (``napari_lsms._main.launch``: the sample CT, the segment and fine-tune
widgets, a sample expression typed in), then saves

- ``window_widget.png``: the window before segmenting,
- ``window_result.png``: after segmenting, the mask over the CT,

and prints a caption naming the model. The shipped default model is used when present; otherwise
a model with the default configuration and *random weights* is built (its mask means nothing;
the caption says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gui_stall import resolve_model  # noqa: E402 - the same model choice as the GUI benchmark


def settle(app, seconds: float = 0.5) -> None:
    """Let Qt lay out and paint the window."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model file (default: the shipped default model)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--text", help="description (default: the sample's first expression)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="lsms_screenshots_"))
    os.environ["LSMS_HOME"] = str(workdir)  # no user models or recent descriptions in the pictures

    from qtpy.QtWidgets import QApplication

    from napari_lsms._main import launch
    from napari_lsms._sample_data import SAMPLE_LABELS_NAME

    model = resolve_model(args.model, workdir)
    viewer, widget = launch(["--text", args.text] if args.text else [], show=True)
    app = QApplication.instance()
    listed = widget.select_model(model)
    if not listed:
        widget.model_combo.addItem(f"{model.stem} (random weights)", str(model.resolve()))
        widget.model_combo.setCurrentIndex(widget.model_combo.count() - 1)
    viewer.window._qt_window.resize(1500, 950)
    truth = viewer.layers[SAMPLE_LABELS_NAME].data if SAMPLE_LABELS_NAME in viewer.layers else None
    if truth is not None:  # show the slice with the most lesion voxels
        z = int(np.argmax((truth > 0).sum(axis=(1, 2))))
        image = widget.selected_image()
        viewer.dims.set_point(0, image.data_to_world((z, 0, 0))[0])
    args.out.mkdir(parents=True, exist_ok=True)
    settle(app, 1.0)
    viewer.screenshot(str(args.out / "window_widget.png"), canvas_only=False, flash=False)

    widget.segment()
    while widget.is_running:
        app.processEvents()
        time.sleep(0.01)
    settle(app, 1.0)
    viewer.screenshot(str(args.out / "window_result.png"), canvas_only=False, flash=False)

    from napari_lsms._widget import LABELS_NAME

    found = LABELS_NAME in viewer.layers
    print(f"description: {widget.description_edit.text()!r}")
    print(f"model: {model}" + ("" if listed else " (default configuration, random weights)"))
    print(f"result: {widget.status_label.text()} ({'mask shown' if found else 'nothing found: no mask in the picture'})")
    print(f"wrote {args.out / 'window_widget.png'} and {args.out / 'window_result.png'}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
