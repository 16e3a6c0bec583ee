"""The plugin's reader, writer and sample data, and its cheap import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lsms_core.intensity import WINDOW_PRESETS, level_width_to_range
from napari_lsms._reader import GEOMETRY_KEY, get_reader, read_ct
from napari_lsms._writer import write_labels

# A non-trivial orientation: x and y swapped and y flipped (a rotated scan), so that a writer that
# drops or transposes the direction fails the round trip.
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (0.8, 0.7, 2.5)
ORIGIN = (-12.5, 30.0, -100.0)


@pytest.fixture()
def ct_file(tmp_path):
    """A small HU volume (z=6, y=20, x=24) with a rotated direction, written with SimpleITK."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=(6, 20, 24)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, array


def test_import_does_not_load_heavy_modules():
    code = (
        "import sys, napari_lsms, napari_lsms._reader, napari_lsms._writer, napari_lsms._sample_data, "
        "napari_lsms._main\n"
        "heavy = [m for m in ('torch', 'transformers', 'SimpleITK') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the plugin loaded {out.stdout.strip()}"


def test_reader_declines_unsupported_paths(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a CT")
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    (empty_folder / "readme.md").write_text("no DICOM here")
    for path in (text, png, empty_folder, tmp_path / "missing.nii.gz", [str(text), str(png)]):
        assert get_reader(str(path) if not isinstance(path, list) else path) is None, path


def test_reader_accepts_volume_files_and_dicom(tmp_path, ct_file):
    path, _ = ct_file
    assert get_reader(str(path)) is read_ct
    assert get_reader([str(path)]) is read_ct
    dicom_folder = tmp_path / "series"
    dicom_folder.mkdir()
    (dicom_folder / "IM0001").write_bytes(bytes(128) + b"DICM" + bytes(16))  # DICOM magic, no suffix
    assert get_reader(str(dicom_folder)) is read_ct
    assert get_reader(str(dicom_folder / "IM0001")) is read_ct


def test_reader_layer_keeps_geometry_and_uses_a_ct_window(ct_file):
    path, array = ct_file
    [(data, kwargs, layer_type)] = get_reader(str(path))(str(path))
    assert layer_type == "image"
    np.testing.assert_array_equal(data, array)
    assert kwargs["name"] == "scan"
    assert kwargs["scale"] == pytest.approx(SPACING[::-1])
    assert kwargs["translate"] == pytest.approx(ORIGIN[::-1])
    assert kwargs["colormap"] == "gray"
    assert kwargs["contrast_limits"] == pytest.approx(level_width_to_range(*WINDOW_PRESETS["abdomen"]))
    geometry = kwargs["metadata"][GEOMETRY_KEY]
    assert geometry["direction"] == pytest.approx(DIRECTION)
    assert geometry["spacing"] == pytest.approx(SPACING)
    assert geometry["origin"] == pytest.approx(ORIGIN)
    assert geometry["shape"] == list(array.shape)
    assert geometry["path"] == str(path)
    import json

    json.dumps(geometry)  # JSON-like: survives a project save


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_labels_round_trip_in_source_geometry(tmp_path, ct_file, suffix):
    from napari.layers import Labels

    from lsms_core.io import read_volume

    path, array = ct_file
    [(_, image_kwargs, _)] = read_ct(str(path))
    mask = np.zeros(array.shape, dtype=np.uint8)
    mask[2:4, 5:9, 3:15] = 1
    mask[1, 0:2, 0:3] = 3
    labels = Labels(
        mask, scale=image_kwargs["scale"], translate=image_kwargs["translate"], metadata=image_kwargs["metadata"]
    )
    data, meta, layer_type = labels.as_layer_data_tuple()
    assert layer_type == "labels"
    out = tmp_path / f"mask{suffix}"
    assert write_labels(str(out), data, meta) == [str(out)]

    written, source = read_volume(out), read_volume(path)
    np.testing.assert_array_equal(written.array, mask)
    assert written.spacing == pytest.approx(source.spacing)
    assert written.origin == pytest.approx(source.origin)
    assert written.direction == pytest.approx(source.direction)
    [(reread, reread_kwargs, _)] = read_ct(str(out))  # and the mask opens again over the CT
    np.testing.assert_array_equal(reread, mask)
    assert reread_kwargs["scale"] == pytest.approx(image_kwargs["scale"])


def test_viewer_open_and_save_through_the_plugin(make_napari_viewer, tmp_path, ct_file):
    from lsms_core.io import read_volume

    path, array = ct_file
    viewer = make_napari_viewer()
    [image] = viewer.open(str(path), plugin="napari-lsms")
    assert image.metadata[GEOMETRY_KEY]["direction"] == pytest.approx(DIRECTION)
    mask = (array > 1000).astype(np.uint8)
    labels = viewer.add_labels(mask, scale=image.scale, translate=image.translate, metadata=dict(image.metadata))
    out = tmp_path / "saved.nii.gz"
    labels.save(str(out), plugin="napari-lsms")
    written = read_volume(out)
    np.testing.assert_array_equal(written.array, mask)
    assert written.direction == pytest.approx(DIRECTION)


def test_writer_without_geometry_uses_scale_and_warns(tmp_path):
    from lsms_core.io import read_volume

    mask = np.zeros((3, 5, 7), dtype=np.int32)
    mask[1, 2, 3] = 2
    meta = {"name": "hand drawn", "scale": (3.0, 0.5, 0.25), "translate": (10.0, 20.0, 30.0), "metadata": {}}
    out = tmp_path / "hand.nii"
    with pytest.warns(UserWarning, match="no CT geometry"):
        write_labels(str(out), mask, meta)
    written = read_volume(out)
    np.testing.assert_array_equal(written.array, mask)
    assert written.spacing == pytest.approx((0.25, 0.5, 3.0))
    assert written.origin == pytest.approx((30.0, 20.0, 10.0))
    assert written.direction == pytest.approx(np.eye(3).ravel())


def test_writer_rejects_bad_input(tmp_path, ct_file):
    path, array = ct_file
    [(_, image_kwargs, _)] = read_ct(str(path))
    meta = {"name": "lesions", "metadata": image_kwargs["metadata"]}
    wrong_shape = np.zeros((array.shape[0], array.shape[1] + 1, array.shape[2]), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not match the CT"):
        write_labels(str(tmp_path / "a.nii.gz"), wrong_shape, meta)
    with pytest.raises(ValueError, match="unsupported extension"):
        write_labels(str(tmp_path / "a.png"), np.zeros(array.shape, np.uint8), meta)
    with pytest.raises(ValueError, match="only 3D"):
        write_labels(str(tmp_path / "a.nii.gz"), np.zeros((4, 4), np.uint8), {"name": "flat"})
    with pytest.raises(ValueError, match="non-integer data"):
        write_labels(str(tmp_path / "a.nii.gz"), np.full(array.shape, 0.5, np.float32), meta)
    negative = np.zeros(array.shape, np.int16)
    negative[0, 0, 0] = -1
    with pytest.raises(ValueError, match="negative label values"):
        write_labels(str(tmp_path / "a.nii.gz"), negative, meta)
    assert not list(tmp_path.glob("a.*"))  # nothing half-written


@pytest.mark.parametrize("high", [255, 256, 70000])
def test_writer_keeps_every_label_value(tmp_path, ct_file, high):
    """Label ids beyond a byte (many descriptions) are written in a wider type, never wrapped."""
    from lsms_core.io import read_volume

    path, array = ct_file
    [(_, image_kwargs, _)] = read_ct(str(path))
    labels = np.zeros(array.shape, dtype=np.int64)
    labels[0, 0, 0], labels[1, 1, 1], labels[2, 2, 2] = 1, high - 1, high
    out = tmp_path / "many.nii.gz"
    write_labels(str(out), labels, {"name": "lesions", "metadata": image_kwargs["metadata"]})
    written = read_volume(out).array
    np.testing.assert_array_equal(written, labels)
    assert written.dtype.itemsize == (1 if high <= 255 else 2 if high <= 65535 else 4)


def test_sample_ct_layers():
    from napari_lsms._reader import EXPRESSIONS_KEY
    from napari_lsms._sample_data import SAMPLE_LABELS_NAME, sample_ct

    (image, image_kwargs, image_type), (lesions, labels_kwargs, labels_type) = sample_ct()
    assert (image_type, labels_type) == ("image", "labels")
    assert labels_kwargs["name"] == SAMPLE_LABELS_NAME
    assert image.shape == lesions.shape and image.ndim == 3
    assert image_kwargs["scale"] == labels_kwargs["scale"]
    assert image_kwargs["translate"] == labels_kwargs["translate"]
    assert image_kwargs["metadata"][GEOMETRY_KEY] == labels_kwargs["metadata"][GEOMETRY_KEY]
    assert lesions.max() >= 1
    expressions = image_kwargs["metadata"][EXPRESSIONS_KEY]
    assert expressions and all(isinstance(t, str) and t for t in expressions)
    # the sample keeps its file orientation (RAS), so the geometry is not the identity
    assert image_kwargs["metadata"][GEOMETRY_KEY]["direction"] != pytest.approx(np.eye(3).ravel())


def test_flipped_ct_is_shown_in_lps_world_coordinates(tmp_path):
    """A RAS file gets a flip ``rotate``: napari's world point of a voxel is its LPS position (mm)."""
    import SimpleITK as sitk
    from napari.layers import Image

    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), dtype=np.int16))
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((50.0, 40.0, -30.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # RAS
    path = tmp_path / "ras.nii.gz"
    sitk.WriteImage(image, str(path))
    [(data, kwargs, _)] = read_ct(str(path))
    assert kwargs["scale"] == pytest.approx((2.0, 0.75, 0.5)) and kwargs["translate"] == pytest.approx((-30.0, 40.0, 50.0))
    layer = Image(data, **kwargs)
    for index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        physical = image.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1]))
        assert layer.data_to_world(index) == pytest.approx(physical[::-1])
