"""The segment widget, end to end with a tiny model, and its Qt-free helpers."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest

from lsms_core.intensity import WINDOW_PRESETS, level_width_to_range
from napari_lsms._reader import EXPRESSIONS_KEY, GEOMETRY_KEY, read_ct
from napari_lsms._widget import (
    LABELS_NAME,
    SOURCE_IMAGE_ID_KEY,
    SOURCE_IMAGE_KEY,
    LabelBook,
    RecentDescriptions,
    SegmenterCache,
    merge_mask,
)

WAIT_MS = 60_000
FIRST = "the large hypodense lesion in the right lobe"
SECOND = "the small cyst in the left lobe"

# ---------------------------------------------------------------------------------------------
# Qt-free helpers
# ---------------------------------------------------------------------------------------------


def test_label_book_gives_one_id_per_description():
    book = LabelBook()
    assert book.label_for(FIRST) == 1
    book.record(FIRST, 1, model_version="v1", voxels=10, volume_ml=0.5, found=True)
    assert book.label_for("  The large  hypodense lesion in the RIGHT lobe ") == 1  # same words
    assert book.label_for(SECOND) == 2
    assert book.label_for(SECOND, taken=[7]) == 8  # never reuse an id painted by hand
    book.record(SECOND, 2, model_version="v1", voxels=3, volume_ml=0.1, found=True)

    features = book.to_features()
    assert list(features["label"]) == [1, 2] and list(features["index"]) == [1, 2]
    assert list(features["description"]) == [FIRST, SECOND]
    reloaded = LabelBook(features)  # the layer's features table is the book's memory
    assert reloaded.label_for(SECOND) == 2 and reloaded.label_for("another one") == 3
    assert reloaded.description_of(1) == FIRST


def test_merge_mask_replaces_only_its_label_within_the_range():
    labels = np.zeros((4, 3, 3), dtype=np.uint8)
    labels[:, 0, 0] = 1
    labels[:, 2, 2] = 2
    mask = np.zeros_like(labels)
    mask[1:3, 1, 1] = 1
    voxels = merge_mask(labels, mask, 1, slices=(1, 3))
    assert labels[0, 0, 0] == 1 and labels[3, 0, 0] == 1  # outside the range: kept
    assert labels[1, 0, 0] == 0 and labels[1, 1, 1] == 1  # inside: replaced by the new result
    assert (labels[:, 2, 2] == 2).all()
    assert voxels == np.count_nonzero(labels == 1) == 4


def test_recent_descriptions_persist(tmp_path):
    path = tmp_path / "recent.json"
    recent = RecentDescriptions(path, limit=2)
    recent.add(FIRST)
    recent.add(SECOND)
    recent.add(FIRST.upper())  # same description: moves to the front, no duplicate
    assert [t.casefold() for t in RecentDescriptions(path).items] == [FIRST, SECOND]
    recent.add("a third one")
    assert len(RecentDescriptions(path).items) == 2
    path.write_text("{broken")
    with pytest.warns(UserWarning, match="unreadable"):
        assert RecentDescriptions(path).items == []


# ---------------------------------------------------------------------------------------------
# The widget
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def lsms_home(tmp_path, monkeypatch):
    home = tmp_path / "lsms_home"
    monkeypatch.setenv("LSMS_HOME", str(home))
    return home


@pytest.fixture()
def model_path(lsms_home, tiny_config, biased_model):
    from lsms_core.checkpoint import save_model

    return save_model(
        biased_model(tiny_config, True), lsms_home / "models" / "tiny.safetensors", version="t1"
    )


@pytest.fixture()
def absent_model_path(lsms_home, tiny_config, biased_model):
    from lsms_core.checkpoint import save_model

    return save_model(
        biased_model(tiny_config, False), lsms_home / "models" / "never.safetensors", version="t0"
    )


def test_segmenter_cache_loads_once_and_keeps_only_the_most_recent(model_path, absent_model_path):
    cache = SegmenterCache(max_models=1)
    first = cache.get(model_path, "cpu")
    assert cache.get(model_path, "cpu") is first and len(cache) == 1  # loaded once
    other = cache.get(absent_model_path, "cpu")
    assert other is not first and len(cache) == 1  # the older model was dropped
    assert cache.get(model_path, "cpu") is not first  # and is loaded again when asked for
    with pytest.raises(ValueError, match="max_models"):
        SegmenterCache(max_models=0)


@pytest.fixture()
def ct_path(tmp_path):
    """A synthetic abdomen (8 x 40 x 48, body ellipse in air) in RAS orientation, as NIfTI."""
    from lsms_core.io import Volume, write_volume

    z, y, x = np.mgrid[0:8, 0:40, 0:48]
    array = np.full((8, 40, 48), -1000, dtype=np.int16)
    array[((y - 20) / 16) ** 2 + ((x - 24) / 20) ** 2 < 1] = 40
    array[(z > 2) & ((y - 18) ** 2 + (x - 16) ** 2 < 16)] = -20
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    volume = Volume(array, spacing=(1.5, 1.5, 3.0), origin=(40.0, 30.0, -50.0), direction=ras)
    path = tmp_path / "synthetic_ct.nii.gz"
    write_volume(path, array, like=volume)
    return path


@pytest.fixture()
def notes(monkeypatch):
    """Capture napari notifications as (level, message) pairs."""
    from napari.utils import notifications

    captured: list[tuple[str, str]] = []
    for level in ("info", "warning", "error"):
        monkeypatch.setattr(
            notifications, f"show_{level}", lambda msg, _lvl=level: captured.append((_lvl, msg))
        )
    return captured


def _viewer_with_ct(make_napari_viewer, ct_path):
    viewer = make_napari_viewer()
    [(data, kwargs, _)] = read_ct(str(ct_path))
    image = viewer.add_image(data, **kwargs)
    return viewer, image


def _widget(viewer, model_path):
    from napari_lsms._widget import SegmentWidget

    widget = SegmentWidget(viewer)
    assert widget.select_model(model_path)
    return widget


def _run(qtbot, widget, description, scope="all slices", first=0, last=0):
    widget.set_description(description)
    widget.scope_combo.setCurrentText(scope)
    widget.first_slice.setValue(first)
    widget.last_slice.setValue(last)
    worker = widget.segment()
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    return worker


def test_segment_makes_labels_with_one_id_per_description(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes
):
    from qtpy.QtCore import Qt

    from lsms_core.infer import Segmenter
    from lsms_core.io import read_volume

    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    assert widget.device_combo.itemText(0) == "auto"  # at once; the devices come from a worker
    qtbot.waitUntil(lambda: widget.device_combo.findText("cpu") >= 0, timeout=WAIT_MS)

    # Enter in the description box runs the segmentation (slices 0..2 only)
    widget.scope_combo.setCurrentText("slice range")
    widget.first_slice.setValue(0)
    widget.last_slice.setValue(2)
    widget.set_description(FIRST)
    qtbot.keyClick(widget.description_edit, Qt.Key.Key_Return)
    assert widget.is_running
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert not [n for n in notes if n[0] == "error"], notes

    labels = viewer.layers[LABELS_NAME]
    assert labels.scale == pytest.approx(image.scale) and labels.translate == pytest.approx(image.translate)
    np.testing.assert_allclose(labels.rotate, image.rotate)
    assert np.diag(image.rotate).tolist() == [1, -1, -1]  # the RAS CT is shown the radiological way
    assert labels.metadata[GEOMETRY_KEY] == image.metadata[GEOMETRY_KEY]
    assert labels.metadata[SOURCE_IMAGE_KEY] == image.name
    assert labels.metadata[SOURCE_IMAGE_ID_KEY] == str(image.unique_id)
    volume = read_volume(ct_path)
    expected = Segmenter(model_path, device="cpu").segment(volume, FIRST, slices=(0, 3)).mask
    assert expected.any() and not expected[3:].any()
    np.testing.assert_array_equal(labels.data == 1, expected > 0)
    row = labels.features.iloc[0]
    assert (row["label"], row["description"], row["model_version"], bool(row["found"])) == (
        1,
        FIRST,
        "t1",
        True,
    )
    assert row["voxels"] == np.count_nonzero(expected)
    assert row["volume_ml"] == pytest.approx(row["voxels"] * 1.5 * 1.5 * 3.0 / 1000)
    datetime.fromisoformat(row["time"])

    # a second description gets id 2 and leaves label 1 alone
    _run(qtbot, widget, SECOND, "slice range", 5, 6)
    assert list(labels.features["label"]) == [1, 2]
    np.testing.assert_array_equal(labels.data == 1, expected > 0)
    assert (labels.data[5:7] == 2).any() and not (labels.data[:5] == 2).any()

    # re-running the first description (current slice) reuses id 1
    viewer.dims.set_point(0, image.data_to_world((4, 0, 0))[0])
    _run(qtbot, widget, FIRST.upper(), "current slice")
    assert list(labels.features["label"]) == [1, 2]
    assert (labels.data[4] == 1).any() and (labels.data[0] == 1).any()
    assert len(widget.segmenters) == 1  # the model was loaded once

    # the descriptions are remembered across sessions
    saved = json.loads((lsms_home / "recent_descriptions.json").read_text())["descriptions"]
    assert [t.casefold() for t in saved] == [FIRST, SECOND]
    from napari_lsms._widget import SegmentWidget

    assert SECOND in SegmentWidget(viewer)._completion_model.stringList()


def test_the_multiscale_option_reaches_the_segmenter(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes, monkeypatch
):
    from lsms_core.infer import DEFAULT_SCALES, Segmenter
    from lsms_core.io import read_volume

    seen = []
    segment = Segmenter.segment

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("scales"))
        return segment(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", spy)
    viewer, _image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    assert len(DEFAULT_SCALES) > 1
    assert widget.multiscale_check.isChecked()  # the library's default scales unless unticked
    _run(qtbot, widget, FIRST, "slice range", 0, 2)
    first = viewer.layers[LABELS_NAME].data.copy()
    widget.multiscale_check.setChecked(False)
    _run(qtbot, widget, FIRST, "slice range", 0, 2)
    assert not [n for n in notes if n[0] == "error"], notes
    assert seen == [DEFAULT_SCALES, (1.0,)]
    assert len(widget.segmenters) == 1  # the same loaded model serves both
    expected = Segmenter(model_path, device="cpu").segment(read_volume(ct_path), FIRST, slices=(0, 3))
    np.testing.assert_array_equal(first == 1, expected.mask > 0)


def test_preload_loads_the_selected_model_once_in_the_background(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes
):
    viewer, _ = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    assert len(widget.segmenters) == 0
    assert widget.preload() is not None
    qtbot.waitUntil(lambda: len(widget.segmenters) == 1, timeout=WAIT_MS)  # loaded off the GUI thread
    _run(qtbot, widget, FIRST)  # the run reuses the preloaded model
    assert len(widget.segmenters) == 1 and widget.last_result is not None


def test_cancel_leaves_the_labels_unchanged(make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes):
    viewer, _ = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    _run(qtbot, widget, FIRST, "slice range", 0, 1)
    bar = widget.progress_bar
    assert bar.value() == bar.maximum() == 2  # both slices of the range hold body: 2 of 2 done
    labels = viewer.layers[LABELS_NAME]
    before_data, before_features = labels.data.copy(), labels.features.copy()

    widget.set_description(SECOND)
    widget.scope_combo.setCurrentText("all slices")
    results = []
    worker = widget.segment()
    worker.returned.connect(results.append)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert results and (results[0] is None or results[0].cancelled)
    np.testing.assert_array_equal(labels.data, before_data)
    assert labels.features.equals(before_features)
    assert any(level == "info" and "cancelled" in msg for level, msg in notes)
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert bar.maximum() > 0 and bar.value() < bar.maximum()  # neither busy forever nor "done"


def test_not_found_says_so_and_gives_the_description_a_label_to_paint(
    make_napari_viewer, qtbot, lsms_home, absent_model_path, ct_path, notes
):
    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, absent_model_path)
    _run(qtbot, widget, FIRST)
    assert any(level == "warning" and "no lesion matching" in msg for level, msg in notes)
    labels = viewer.layers[LABELS_NAME]  # empty, ready for painting the missed lesion
    assert not labels.data.any() and labels.selected_label == 1
    row = labels.features.iloc[0]
    assert (row["label"], row["description"], bool(row["found"]), row["voxels"]) == (1, FIRST, False, 0)
    last = widget.last_result
    assert last.description == FIRST and last.label == 1 and not last.model_mask.any() and last.image is image


def test_bad_inputs_give_notifications(make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes):
    from napari_lsms._widget import SegmentWidget

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    widget.set_description(FIRST)

    def last_warning_after(action):
        notes.clear()
        assert action() is None  # refused: no worker
        assert not widget.is_running
        assert notes and notes[-1][0] == "warning", notes
        return notes[-1][1]

    assert "no image layer" in last_warning_after(widget.segment)
    viewer.add_image(np.zeros((20, 20)), name="flat")
    assert "3D CT volume" in last_warning_after(widget.segment)
    viewer.add_image(np.zeros((5, 20, 20, 3), dtype=np.uint8), name="photo", rgb=True)
    widget.image_combo.setCurrentText("photo")
    assert "RGB" in last_warning_after(widget.segment)

    [(data, kwargs, _)] = read_ct(str(ct_path))
    image = viewer.add_image(data, **kwargs)
    widget.image_combo.setCurrentText(image.name)
    widget.set_description("   ")
    assert "type a description" in last_warning_after(widget.segment)
    widget.set_description(FIRST)
    assert "no model" in last_warning_after(lambda: (widget.model_combo.clear(), widget.segment())[1])
    widget.refresh_models()
    assert widget.select_model(model_path)

    wrong = viewer.add_labels(
        np.zeros((2, 2, 2), np.uint8), name="old result", metadata={SOURCE_IMAGE_ID_KEY: str(image.unique_id)}
    )
    assert "has shape" in last_warning_after(widget.segment)
    viewer.layers.remove(wrong)

    # a model that fails to load: an error notification, no layer, the widget ready again
    model_path.unlink()
    notes.clear()
    assert widget.segment() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert any(level == "error" and "could not load model" in msg for level, msg in notes), notes
    assert LABELS_NAME not in viewer.layers and widget.segment_button.isEnabled()


def test_window_presets_change_only_the_display(make_napari_viewer, lsms_home, model_path, ct_path):
    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    data = image.data.copy()
    widget.window_combo.setCurrentText("lung")
    assert tuple(image.contrast_limits) == pytest.approx(level_width_to_range(*WINDOW_PRESETS["lung"]))
    np.testing.assert_array_equal(image.data, data)


def test_models_and_suggestions_refresh(
    make_napari_viewer, lsms_home, model_path, tiny_config, ct_path, biased_model
):
    from lsms_core.checkpoint import save_model

    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    newer = save_model(
        biased_model(tiny_config, True), lsms_home / "models" / "ft" / "model.safetensors", version="t2"
    )
    assert widget.model_combo.findData(str(newer.resolve())) < 0
    widget.refresh_models()
    assert widget.model_combo.findData(str(newer.resolve())) >= 0
    assert widget.model_combo.currentData() == str(model_path.resolve())  # the selection is kept

    image.metadata = {**image.metadata, EXPRESSIONS_KEY: ["the lesion in segment vii"]}
    widget._refresh_suggestions()
    assert "the lesion in segment vii" in widget._completion_model.stringList()
    assert "the lesion in segment vii" in [a.text() for a in widget.suggestions_menu.actions()]


def test_save_correction_keeps_model_and_corrected_masks(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes
):
    from lsms_core.data.corrections import CorrectionsDataset
    from lsms_core.io import read_volume

    viewer, _ = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    notes.clear()
    widget.save_correction()
    assert notes and "segment a lesion first" in notes[-1][1]

    _run(qtbot, widget, FIRST, "slice range", 2, 3)
    labels = viewer.layers[LABELS_NAME]
    model_mask = labels.data == 1
    erased = np.zeros_like(model_mask)
    erased[2, :10] = model_mask[2, :10]
    labels.data[erased] = 0  # the user erases part of the answer

    root = lsms_home / "corrections"
    assert widget.corrections_edit.text() == str(root)
    worker = widget.save_correction()
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        pass
    dataset = CorrectionsDataset(root)
    [record] = dataset.records()
    assert record["expression"] == FIRST and record["model_version"] == "t1"
    assert record["changed_voxels"] == np.count_nonzero(erased) > 0
    np.testing.assert_array_equal(read_volume(root / record["model_mask"]).array, model_mask)
    np.testing.assert_array_equal(read_volume(root / record["mask"]).array, labels.data == 1)
    assert widget.corrections_count.text() == "1"


def test_main_opens_a_ct_with_the_widgets_docked(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes
):
    from lsms_core.checkpoint import default_model_path
    from napari_lsms._main import launch

    # launch() makes its own viewer; make_napari_viewer (unused) gives this test napari's fresh
    # plugin registry, so a second launch in the session does not register the plugin twice
    viewer, widget = launch(["--image", str(ct_path), "--text", SECOND], show=False)
    try:
        assert widget.selected_image() is not None and widget.selected_image().ndim == 3
        assert widget.description_edit.text() == SECOND
        docked = list(viewer.window.dock_widgets.values())
        assert widget in docked
        assert any(type(w).__name__ == "FineTuneWidget" for w in docked), docked
        if default_model_path().is_file():
            assert widget.model_combo.currentData() == str(default_model_path().resolve())
        else:
            assert any(level == "warning" and "default model is missing" in msg for level, msg in notes), (
                notes
            )
    finally:
        viewer.close()


# ---------------------------------------------------------------------------------------------
# Review fixes: not-found results, reviewed slices, linking to the right image, teardown,
# the slice range, guessed geometry
# ---------------------------------------------------------------------------------------------


def _save(qtbot, widget):
    worker = widget.save_correction()
    assert worker is not None
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        pass


def test_a_missed_lesion_is_saved_as_its_own_description(
    make_napari_viewer, qtbot, lsms_home, model_path, absent_model_path, ct_path, notes
):
    from lsms_core.data.corrections import CorrectionsDataset
    from lsms_core.io import read_volume

    viewer, _ = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    _run(qtbot, widget, FIRST, "slice range", 2, 5)  # lesion A: found, label 1
    labels = viewer.layers[LABELS_NAME]
    assert (labels.data == 1).any()

    assert widget.select_model(absent_model_path)
    _run(qtbot, widget, SECOND)  # lesion B: not found, still the current result, label 2
    assert widget.last_result.description == SECOND and widget.last_result.label == 2
    assert labels.selected_label == 2
    painted = np.zeros(labels.data.shape, dtype=bool)
    painted[1, 10:14, 12:16] = True
    labels.data[painted] = 2  # the user paints the lesion the model missed
    first_voxels = labels.data == 1

    root = lsms_home / "corrections"
    _save(qtbot, widget)
    [record] = CorrectionsDataset(root).records()
    assert record["expression"] == SECOND  # not lesion A
    assert not read_volume(root / record["model_mask"]).array.any()
    np.testing.assert_array_equal(read_volume(root / record["mask"]).array, painted)
    np.testing.assert_array_equal(labels.data == 1, first_voxels)  # B's run left A alone

    # Saving the same description of the same image again replaces its record (no conflicting twin).
    labels.data[0, 10:14, 12:16] = 2  # outside A's slices
    _save(qtbot, widget)
    [again] = CorrectionsDataset(root).records()
    assert again["expression"] == SECOND and again["replaces"] == [record["id"]]
    assert again["changed_voxels"] == 2 * 16
    assert any(level == "info" and "replaces the earlier correction" in msg for level, msg in notes), notes

    # Re-running A where nothing is found clears A's old voxels in the segmented slices only.
    assert (labels.data[3:8] == 1).any()
    _run(qtbot, widget, FIRST, "slice range", 3, 7)
    assert not (labels.data[3:8] == 1).any()
    np.testing.assert_array_equal(labels.data[:3] == 1, first_voxels[:3])
    assert (labels.data == 2).sum() == 2 * 16  # B's painting is untouched
    row = labels.features.set_index("label").loc[1]
    assert not bool(row["found"]) and row["voxels"] == np.count_nonzero(first_voxels[:3])


def test_partial_scope_correction_records_the_reviewed_slices(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes
):
    from lsms_core.data.corrections import CorrectionsDataset
    from lsms_core.data.dataset import ReferringDataset

    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    root = lsms_home / "corrections"

    _run(qtbot, widget, FIRST, "slice range", 2, 4)
    assert widget.last_result.slices == (2, 5)
    _save(qtbot, widget)
    viewer.dims.set_point(0, image.data_to_world((6, 0, 0))[0])
    _run(qtbot, widget, SECOND, "current slice")
    _save(qtbot, widget)
    # The RAS CT's slice axis already runs foot to head: canonical slices are the input's.
    by_text = {r["expression"]: r for r in CorrectionsDataset(root).records()}
    assert by_text[FIRST]["slices"] == [2, 4] and by_text[SECOND]["slices"] == [6, 6]

    _run(qtbot, widget, FIRST, "all slices")  # reviewed everywhere: no restriction
    _save(qtbot, widget)
    records = ReferringDataset(root).expressions()
    assert [r["expression"] for r in records] == [SECOND, FIRST]
    assert "slices" not in records[1] and records[0]["slices"] == [6, 6]


def test_results_never_go_into_another_images_labels(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes
):
    viewer, case1 = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    _run(qtbot, widget, FIRST)
    old = viewer.layers[LABELS_NAME]
    before = old.data.copy()
    assert before.any()

    # Close case 1, open case 2: also "synthetic_ct", same shape (and here even the same geometry).
    viewer.layers.remove(case1)
    [(data, kwargs, _)] = read_ct(str(ct_path))
    case2 = viewer.add_image(data.copy(), **kwargs)
    assert case2.name == case1.name and widget.selected_image() is case2
    _run(qtbot, widget, SECOND)
    new = widget.last_result.labels
    assert new is not old and new in viewer.layers
    assert new.metadata[SOURCE_IMAGE_ID_KEY] == str(case2.unique_id)
    assert list(new.features["description"]) == [SECOND] and new.selected_label == 1
    np.testing.assert_array_equal(old.data, before)  # case 1's layer is untouched
    assert list(old.features["description"]) == [FIRST]
    _run(qtbot, widget, FIRST)  # the same image again: its own layer is reused
    assert widget.last_result.labels is new and list(new.features["label"]) == [1, 2]

    # The same image layer with another geometry (origin moved): a new layer, not the old grid.
    geometry = dict(case2.metadata[GEOMETRY_KEY], origin=[0.0, 0.0, 0.0])
    case2.metadata = {**case2.metadata, GEOMETRY_KEY: geometry}
    _run(qtbot, widget, SECOND)
    assert widget.last_result.labels not in (old, new)
    assert widget.last_result.labels.metadata[GEOMETRY_KEY]["origin"] == [0.0, 0.0, 0.0]
    assert not [n for n in notes if n[0] == "error"], notes


class _SlowSegmenter:
    """Stands in for a Segmenter: blocks until cancelled (at most 10 s), then answers "found"."""

    def __init__(self):
        import threading

        self.started, self.saw_cancel = threading.Event(), threading.Event()

    def segment(self, volume, text, *, slices=None, progress=None, should_cancel=None, scales=None):
        import time
        from types import SimpleNamespace

        self.started.set()
        deadline = time.monotonic() + 10
        while not should_cancel() and time.monotonic() < deadline:
            time.sleep(0.01)
        if should_cancel():
            self.saw_cancel.set()
        mask = np.ones(volume.array.shape, dtype=np.uint8)
        return SimpleNamespace(mask=mask, found=True, cancelled=False, model_version="slow")


def _connected_to(emitter, obj) -> bool:
    """Whether a napari event emitter still calls a method of ``obj``."""
    for callback in emitter.callbacks:
        target = callback[0] if isinstance(callback, tuple) else getattr(callback, "__self__", None)
        if callable(target) and not hasattr(target, "events"):  # a weak reference
            target = target()
        if target is obj:
            return True
    return False


def test_destroying_the_widget_mid_run_cancels_and_disconnects(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes, monkeypatch
):
    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    events = viewer.layers.events
    assert _connected_to(events.inserted, widget) and _connected_to(image.events.name, widget)
    slow = _SlowSegmenter()
    monkeypatch.setattr(widget.segmenters, "get", lambda *_args, **_kwargs: slow)
    widget.set_description(FIRST)
    worker = widget.segment()
    assert worker is not None
    qtbot.waitUntil(slow.started.is_set, timeout=WAIT_MS)
    finished = []
    worker.finished.connect(lambda: finished.append(True))

    with qtbot.waitSignal(widget.destroyed, timeout=WAIT_MS):
        widget.deleteLater()  # e.g. the viewer is closed: Qt deletes the dock's widgets
    qtbot.waitUntil(lambda: bool(finished), timeout=WAIT_MS)

    assert widget.is_closed and slow.saw_cancel.is_set()  # the job was told to stop
    assert LABELS_NAME not in viewer.layers and widget.last_result is None  # its answer was dropped
    assert not [n for n in notes if n[0] == "error"], notes  # no deleted Qt object was touched
    for emitter in (events.inserted, events.removed, events.reordered, image.events.name):
        assert not _connected_to(emitter, widget)
    viewer.add_image(np.zeros((3, 4, 4)), name="after")  # the viewer keeps working
    image.name = "renamed"


def test_removing_the_dock_widget_tears_it_down(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes
):
    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    viewer.window.add_dock_widget(widget, name="Segment lesion (LSMS)")
    assert not widget.is_closed
    viewer.window.remove_dock_widget(widget)
    assert widget.is_closed
    assert not _connected_to(viewer.layers.events.inserted, widget)
    assert not _connected_to(image.events.name, widget)


def test_slice_range_resets_only_when_the_image_changes(make_napari_viewer, lsms_home, model_path, ct_path):
    viewer, image = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    widget.scope_combo.setCurrentText("slice range")
    widget.first_slice.setValue(2)
    widget.last_slice.setValue(4)

    viewer.add_points(np.zeros((1, 3)), name="marks")  # another layer added ...
    image.name = "renamed ct"  # ... the image renamed ...
    viewer.layers["marks"].name = "points"  # ... another layer renamed
    other = viewer.add_image(np.zeros((12, 10, 10), dtype=np.int16), name="other ct")
    assert widget.selected_image() is image and widget.image_combo.currentText() == "renamed ct"
    assert (widget.first_slice.value(), widget.last_slice.value()) == (2, 4)

    widget.image_combo.setCurrentText(other.name)  # another image: its own range
    assert widget.last_slice.maximum() == 11 and widget.last_slice.value() == 11
    viewer.layers.remove(other)  # the selected image closed: back to the CT, whose range applies
    assert widget.selected_image() is image and widget.last_slice.value() == 7


def test_slice_boxes_count_like_the_slider_on_a_scan_stored_head_to_foot(
    make_napari_viewer, qtbot, tmp_path, lsms_home, model_path, ct_path, notes
):
    from lsms_core.io import read_volume, write_volume

    volume = read_volume(ct_path)  # RAS, foot to head; store it head to foot (z direction -1)
    flipped = tmp_path / "head_to_foot.nii.gz"
    direction = np.asarray(volume.direction).reshape(3, 3) @ np.diag([1.0, 1.0, -1.0])
    origin = np.asarray(volume.origin) + np.asarray(volume.direction).reshape(3, 3)[:, 2] * 3.0 * 7
    write_volume(
        flipped,
        volume.array[::-1],
        like=type(volume)(volume.array, volume.spacing, tuple(origin), tuple(direction.ravel())),
    )
    viewer, image = _viewer_with_ct(make_napari_viewer, flipped)
    widget = _widget(viewer, model_path)

    viewer.dims.set_point(0, image.data_to_world((6, 0, 0))[0])
    shown = viewer.dims.current_step[0]
    assert shown == 1  # the slider counts from the feet: data slice 6 of 8 is its number 1
    _run(qtbot, widget, FIRST, "slice range", shown, shown)
    assert widget.last_result.slices == (6, 7)
    _run(qtbot, widget, FIRST, "slice range", 0, 2)  # the three lowest slices on screen
    assert widget.last_result.slices == (5, 8)
    _run(qtbot, widget, FIRST, "current slice")  # agrees with the slider's own answer
    assert widget.last_result.slices == (6, 7)
    assert not [n for n in notes if n[0] == "error"], notes


def test_an_image_from_another_reader_keeps_its_geometry_marked_as_guessed(
    make_napari_viewer, qtbot, tmp_path, lsms_home, model_path, ct_path, notes
):
    from napari_lsms._writer import write_labels

    viewer = make_napari_viewer()
    [(data, kwargs, _)] = read_ct(str(ct_path))
    image = viewer.add_image(data, scale=kwargs["scale"], translate=kwargs["translate"], name="plain")
    assert GEOMETRY_KEY not in image.metadata  # not opened with napari-lsms
    widget = _widget(viewer, model_path)
    _run(qtbot, widget, FIRST)
    assert any(level == "warning" and "not opened with napari-lsms" in msg for level, msg in notes)
    labels = viewer.layers[LABELS_NAME]
    assert GEOMETRY_KEY not in labels.metadata  # still a guess, like the image's
    assert labels.scale == pytest.approx(image.scale) and labels.translate == pytest.approx(image.translate)
    meta = {
        "name": labels.name,
        "metadata": labels.metadata,
        "scale": labels.scale,
        "translate": labels.translate,
    }
    with pytest.warns(UserWarning, match="no CT geometry"):
        write_labels(str(tmp_path / "mask.nii.gz"), labels.data, meta)
    _run(qtbot, widget, SECOND)  # both guessed, same grid: the same layer is reused
    assert widget.last_result.labels is labels and list(labels.features["label"]) == [1, 2]


def test_a_lazy_image_is_read_in_the_worker_not_on_the_gui_thread(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, notes, monkeypatch
):
    """A dask CT (e.g. from another reader) is read whole by the segmentation worker; the GUI thread
    reads at most the slices napari displays."""
    import threading

    import dask
    import dask.array as da

    # blocks are computed on the thread that asks for them, not in dask's own pool
    monkeypatch.setitem(dask.config.config, "scheduler", "synchronous")
    [(data, kwargs, _)] = read_ct(str(ct_path))
    reads: list[tuple[int, bool]] = []  # (slice, read on the GUI thread)
    gui = threading.main_thread()

    def record(block, block_info=None):
        reads.append((block_info[0]["chunk-location"][0], threading.current_thread() is gui))
        return block

    lazy = da.from_array(np.asarray(data), chunks=(1, *data.shape[1:])).map_blocks(record, dtype=data.dtype)
    viewer = make_napari_viewer()
    viewer.add_image(lazy, **kwargs)
    widget = _widget(viewer, model_path)
    before = len(reads)
    _run(qtbot, widget, FIRST)
    assert not [n for n in notes if n[0] == "error"], notes
    in_worker = {z for z, on_gui in reads[before:] if not on_gui}
    assert in_worker == set(range(data.shape[0]))  # the whole volume, off the GUI thread
    assert widget.last_result is not None and widget.last_result.description == FIRST


def test_the_corrections_count_is_read_in_a_worker_and_a_stale_count_is_dropped(
    make_napari_viewer, qtbot, lsms_home, model_path, ct_path, monkeypatch
):
    import threading

    from lsms_core.data.corrections import CorrectionsDataset

    counted_on = []

    def slow_len(dataset):
        counted_on.append(threading.current_thread() is threading.main_thread())
        return 7

    monkeypatch.setattr(CorrectionsDataset, "__len__", slow_len)
    root = lsms_home / "corrections"
    root.mkdir(parents=True, exist_ok=True)
    (root / "expressions.jsonl").write_text("")

    viewer, _ = _viewer_with_ct(make_napari_viewer, ct_path)
    widget = _widget(viewer, model_path)
    assert widget.corrections_edit.text() == str(root)
    qtbot.waitUntil(lambda: widget.corrections_count.text() == "7", timeout=WAIT_MS)
    assert counted_on == [False]  # counted off the GUI thread

    # A folder that cannot be read says so (the count runs in a worker, the error is not raised).
    monkeypatch.undo()
    (root / "expressions.jsonl").write_text("{not json\n")
    (root / "dataset.json").write_text("{}")
    widget._refresh_corrections_count()
    qtbot.waitUntil(lambda: widget.corrections_count.text().startswith("unreadable:"), timeout=WAIT_MS)

    # A count overtaken by a save (which reports the new total itself) is not shown.
    import napari_lsms._widget as widget_module

    release = threading.Event()

    def held_count(root):
        release.wait(WAIT_MS / 1000)
        return "99"

    monkeypatch.setattr(widget_module, "_count_corrections", held_count)
    widget._refresh_corrections_count()
    worker = widget.corrections_count_worker
    widget._on_saved(({}, 3))
    with qtbot.waitSignal(worker.returned, timeout=WAIT_MS) as returned:
        release.set()
    assert returned.args == ["99"]
    assert widget.corrections_count.text() == "3"
