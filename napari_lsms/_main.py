"""``napari-lsms`` (also ``lsms gui``): napari with a CT, the LSMS widgets and the default model.

    napari-lsms                      # the sample CT with liver lesions, a first description typed in
    napari-lsms --image ct.nii.gz    # another CT (NIfTI, NRRD, MHA/MHD, DICOM folder)
    napari-lsms --no-sample          # an empty viewer with the widgets
"""

from __future__ import annotations

import argparse
from pathlib import Path

PLUGIN = "napari-lsms"
SEGMENT_WIDGET = "Segment lesion (LSMS)"
FINETUNE_WIDGET = "Fine-tune LSMS"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-lsms",
        description="Open napari with a CT, the LSMS segment and fine-tune widgets and the default model.",
    )
    parser.add_argument("--image", type=Path, help="open this CT instead of the sample")
    parser.add_argument("--no-sample", action="store_true", help="do not open the sample CT")
    parser.add_argument("--text", help="description to type in (default: the sample's first expression)")
    return parser


def launch(argv: list[str] | None = None, *, show: bool = True):
    """Open the viewer with the data and docked widgets; return ``(viewer, segment_widget)``.

    Never raises for a missing default model or a failed widget: it opens anyway and says so
    through napari notifications.
    """
    import napari
    from napari.utils import notifications

    from napari_lsms._reader import EXPRESSIONS_KEY
    from napari_lsms._sample_data import SAMPLE_LABELS_NAME

    args = build_parser().parse_args(argv)
    if args.image is not None and not args.image.exists():
        raise SystemExit(f"napari-lsms: --image {args.image}: no such file or folder")

    viewer = napari.Viewer(title="napari-lsms", show=show)
    if args.image is not None:
        viewer.open(str(args.image), plugin=PLUGIN)
    elif not args.no_sample:
        try:
            viewer.open_sample(PLUGIN, "sample_ct")
        except Exception as exc:  # noqa: BLE001 - open the widgets even without the sample
            notifications.show_error(f"LSMS: could not open the sample CT: {exc}")
        if SAMPLE_LABELS_NAME in viewer.layers:
            viewer.layers[SAMPLE_LABELS_NAME].visible = False  # the model's answer first; truth on demand

    try:  # first, so that the segment widget's tab, added next, is the one in front
        viewer.window.add_plugin_dock_widget(PLUGIN, FINETUNE_WIDGET)
    except Exception as exc:  # noqa: BLE001
        notifications.show_warning(f"LSMS: the fine-tune widget could not be opened: {exc}")
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT_WIDGET, tabify=True)

    _choose_default_model(segment)
    image = segment.selected_image()
    if image is not None:
        viewer.layers.selection.active = image
    expressions = list(image.metadata.get(EXPRESSIONS_KEY) or []) if image is not None else []
    text = args.text or (expressions[0] if expressions else "")
    if text:
        segment.set_description(text)
    return viewer, segment


def _choose_default_model(segment) -> None:
    from napari.utils import notifications

    from lsms_core.checkpoint import default_model_path

    default = default_model_path()
    if default.is_file() and segment.select_model(default):
        return
    notifications.show_warning(
        f"LSMS: the default model is missing ({default}); pick another model in the widget or train "
        "one with `lsms train` (see the README)"
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point: open the window and run napari's event loop."""
    import napari

    _, segment = launch(argv)
    segment.preload()  # load the model while the user looks at the window, not after Segment
    napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
