"""Tests for lsms_core.io: round trips in every format, DICOM series, canonical orientation, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from _datasets import totalseg_reference_dir

from lsms_core.io import (
    Volume,
    canonical_axes,
    from_canonical,
    grid_mismatch,
    read_label,
    read_volume,
    to_canonical,
    write_volume,
)

REFERENCE = totalseg_reference_dir() or Path("/nonexistent")


def rotation(degrees: float, axis: int = 2) -> np.ndarray:
    """A proper rotation matrix about one physical axis."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_ct(shape=(6, 7, 8), direction=None, seed=0) -> Volume:
    """A small int16 'CT' with negative HU and an arbitrary geometry."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    d = np.eye(3) if direction is None else np.asarray(direction)
    return Volume(array, spacing=(0.75, 0.8, 2.5), origin=(-120.5, 30.25, 41.0), direction=tuple(d.ravel()))


def assert_same_volume(a: Volume, b: Volume) -> None:
    assert a.array.dtype == b.array.dtype
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-5)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-5)


def write_dicom_series(folder: Path, volume: Volume, uid: str) -> None:
    """Write ``volume`` as a CT DICOM series, one file per slice, with the geometry tags set."""
    folder.mkdir(parents=True, exist_ok=True)
    d = volume.direction_matrix
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.array.shape[0]):
        sl = sitk.GetImageFromArray(volume.array[z : z + 1])
        sl.SetSpacing(volume.spacing)
        position = np.asarray(volume.origin) + d @ np.array([0.0, 0.0, z * volume.spacing[2]])
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{z + 1}",
            "0008|0060": "CT",
            "0008|103e": "test series",
            "0018|0050": str(volume.spacing[2]),
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": uid,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "\\".join(f"{c:.8f}" for c in (*d[:, 0], *d[:, 1])),
            "0028|0030": f"{volume.spacing[1]}\\{volume.spacing[0]}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{uid[-6:]}_{z:03d}.dcm"))
        writer.Execute(sl)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".nhdr"])
def test_round_trip_every_format(tmp_path, suffix):
    ct = make_ct(direction=rotation(25) @ np.diag([1, -1, -1]))
    path = write_volume(tmp_path / f"ct{suffix}", ct.array, like=ct)
    back = read_volume(path)
    assert_same_volume(back, ct)
    assert back.path == str(path)
    assert back.metadata["format"]
    # No temporary files are left behind.
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_write_volume_label_uses_geometry_of_like(tmp_path):
    ct = make_ct(direction=rotation(-10))
    labels = np.zeros(ct.array.shape, dtype=bool)
    labels[2:4, 1:5, 3:6] = True
    write_volume(tmp_path / "mask.nii.gz", labels, like=ct)
    back = read_label(tmp_path / "mask.nii.gz", like=ct)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels.astype(np.uint8))
    assert grid_mismatch(back, ct) == []


def test_write_volume_rejects_wrong_shape_and_format(tmp_path):
    ct = make_ct()
    with pytest.raises(ValueError, match="does not match"):
        write_volume(tmp_path / "x.nii.gz", np.zeros((2, 2, 2)), like=ct)
    with pytest.raises(ValueError, match="unsupported output format"):
        write_volume(tmp_path / "x.png", ct.array, like=ct)
    assert list(tmp_path.iterdir()) == []


def test_dicom_series_round_trip_keeps_hu_and_geometry(tmp_path):
    ct = make_ct(direction=rotation(20))
    assert ct.array.min() < -500  # negative HU must survive
    write_dicom_series(tmp_path / "dicom", ct, uid="1.2.826.0.1.3680043.2.1125.1")
    back = read_volume(tmp_path / "dicom")
    assert_same_volume(back, ct)
    assert back.metadata["modality"] == "CT"
    assert back.metadata["series_instance_uid"] == "1.2.826.0.1.3680043.2.1125.1"
    # A single file of the series reads the whole series.
    one_file = sorted((tmp_path / "dicom").iterdir())[2]
    assert_same_volume(read_volume(one_file), ct)


def test_dicom_folder_with_several_series_takes_the_largest(tmp_path):
    small, large = make_ct(shape=(3, 7, 8), seed=1), make_ct(shape=(6, 7, 8), seed=2)
    write_dicom_series(tmp_path / "mixed", small, uid="1.2.826.0.1.3680043.2.1125.100001")
    write_dicom_series(tmp_path / "mixed", large, uid="1.2.826.0.1.3680043.2.1125.200002")
    with pytest.warns(UserWarning, match="1.2.826.0.1.3680043.2.1125.200002") as record:
        back = read_volume(tmp_path / "mixed")
    assert "2 DICOM series" in str(record[0].message)
    np.testing.assert_array_equal(back.array, large.array)
    assert back.metadata["n_series_in_folder"] == 2


# ------------------------------------------------------------------------------------------ orientation


@pytest.mark.parametrize("code", ["RAS", "PIR", "SAL", "LPS", "IRP"])
def test_reoriented_copies_share_the_canonical_volume(code):
    ct = make_ct(shape=(5, 6, 7))
    ct_lps = Volume.from_sitk(sitk.DICOMOrient(ct.to_sitk(), "LPS"))
    other = Volume.from_sitk(sitk.DICOMOrient(ct.to_sitk(), code))
    if code != "LPS":
        assert other.array.shape != ct.array.shape or not np.array_equal(other.array, ct.array)
    assert_same_volume(to_canonical(other), ct_lps)
    np.testing.assert_array_equal(from_canonical(to_canonical(other).array, other), other.array)


def test_canonical_matches_dicomorient_for_flips_permutations_and_oblique():
    base = make_ct(shape=(4, 5, 6))
    img = sitk.PermuteAxes(sitk.Flip(base.to_sitk(), [True, False, True]), [2, 0, 1])
    for direction in (None, rotation(30), rotation(30, axis=0) @ np.diag([-1, 1, -1])):
        if direction is not None:
            img.SetDirection(tuple(np.asarray(direction).ravel()))
        volume = Volume.from_sitk(img)
        expected = Volume.from_sitk(sitk.DICOMOrient(img, "LPS"))
        canonical = to_canonical(volume)
        assert_same_volume(canonical, expected)
        np.testing.assert_array_equal(from_canonical(canonical.array, volume), volume.array)


def test_canonical_keeps_every_voxel_at_its_physical_position():
    volume = Volume.from_sitk(sitk.DICOMOrient(make_ct().to_sitk(), "PIR"))
    canonical = to_canonical(volume)
    img, can = volume.to_sitk(), canonical.to_sitk()
    last = tuple(n - 1 for n in img.GetSize())
    for index in [(0, 0, 0), (1, 2, 3), last]:
        point = img.TransformIndexToPhysicalPoint(index)
        can_index = can.TransformPhysicalPointToIndex(point)
        assert img[index] == can[can_index]
    np.testing.assert_allclose(canonical.direction_matrix, np.eye(3), atol=1e-9)


def test_from_canonical_rejects_wrong_shape():
    volume = Volume.from_sitk(sitk.DICOMOrient(make_ct().to_sitk(), "PIR"))
    with pytest.raises(ValueError, match="canonical shape"):
        from_canonical(volume.array, volume)


def test_canonical_axes_of_identity_and_ras():
    assert canonical_axes((1, 0, 0, 0, 1, 0, 0, 0, 1)) == ((0, 1, 2), (False, False, False))
    assert canonical_axes((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == ((0, 1, 2), (True, True, False))


def test_volume_napari_geometry():
    ct = make_ct()
    assert ct.scale == (2.5, 0.8, 0.75)
    assert ct.translate == (41.0, 30.25, -120.5)


@pytest.mark.skipif(
    not (REFERENCE / "example_ct_sm.nii.gz").is_file(), reason="TotalSegmentator files absent"
)
def test_real_ct_liver_is_on_the_patient_right_in_canonical_orientation():
    ct = read_volume(REFERENCE / "example_ct_sm.nii.gz")
    seg = read_label(REFERENCE / "example_seg.nii.gz", like=ct)
    assert ct.array.shape == (30, 101, 122)
    assert ct.array.min() < -900 and ct.array.max() > 300  # HU: air and bone
    canonical = to_canonical(ct)
    np.testing.assert_allclose(canonical.direction_matrix, np.eye(3), atol=1e-6)
    liver = to_canonical(seg.with_array(seg.array == 5)).array
    assert liver.any()
    _, _, x = np.nonzero(liver)
    # Patient's right = small canonical x: the liver's centre is in the left half of the array.
    assert x.mean() < canonical.array.shape[2] / 2
    # Liver tissue is soft tissue in HU.
    assert 0 < np.median(canonical.array[liver]) < 150


# ------------------------------------------------------------------------------------------ bad input


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.nii.gz"):
        read_volume(tmp_path / "nothing.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, suffix):
    ct = make_ct(shape=(20, 30, 30))
    path = write_volume(tmp_path / f"ct{suffix}", ct.array, like=ct)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"ct{suffix}.*cannot read"):
        read_volume(path)


def test_random_bytes(tmp_path):
    for name in ("junk.nii.gz", "junk.nrrd", "junk.bin"):
        path = tmp_path / name
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        with pytest.raises(ValueError, match=f"{name}.*cannot read"):
            read_volume(path)


def test_gzip_of_garbage(tmp_path):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 40))
    with pytest.raises(ValueError, match="bad.nii.gz"):
        read_volume(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no DICOM series"):
        read_volume(tmp_path)


def test_2d_image(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.int16)), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(ValueError, match="slice.nii.gz.*2D image"):
        read_volume(tmp_path / "slice.nii.gz")


def image_4d(array: np.ndarray):
    """A 4D SimpleITK image (t, z, y, x) -> size (x, y, z, t)."""
    return sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])


def test_4d_series(tmp_path):
    sitk.WriteImage(image_4d(np.zeros((3, 4, 5, 6), np.int16)), str(tmp_path / "dyn.nii.gz"))
    with pytest.raises(ValueError, match="dyn.nii.gz.*4D image"):
        read_volume(tmp_path / "dyn.nii.gz")


def test_single_time_point_4d_is_squeezed(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(1, 4, 5, 6)
    sitk.WriteImage(image_4d(array), str(tmp_path / "one.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "one.nii.gz").array, array[0])


def test_rgb_image(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(ValueError, match="rgb.nrrd.*3 components"):
        read_volume(tmp_path / "rgb.nrrd")


def test_nan_in_ct(tmp_path):
    # NRRD keeps NaNs (ITK's NIfTI reader turns them into 0 by itself).
    ct = make_ct()
    array = ct.array.astype(np.float32)
    array[1, 2, 3] = np.nan
    write_volume(tmp_path / "nan.nrrd", array, like=ct)
    with pytest.raises(ValueError, match="nan.nrrd.*1 NaN"):
        read_volume(tmp_path / "nan.nrrd")
    assert np.isnan(read_volume(tmp_path / "nan.nrrd", check_finite=False).array).sum() == 1


def test_label_on_another_grid(tmp_path):
    ct = make_ct()
    shifted = Volume(ct.array, spacing=ct.spacing, origin=(0.0, 0.0, 0.0), direction=ct.direction)
    write_volume(tmp_path / "shifted.nii.gz", np.ones(ct.array.shape, np.uint8), like=shifted)
    with pytest.raises(ValueError, match="shifted.nii.gz.*origin"):
        read_label(tmp_path / "shifted.nii.gz", like=ct)
    small = Volume(
        np.zeros((2, 3, 4), np.uint8), spacing=ct.spacing, origin=ct.origin, direction=ct.direction
    )
    write_volume(tmp_path / "small.nii.gz", small.array, like=small)
    with pytest.raises(ValueError, match="small.nii.gz.*size"):
        read_label(tmp_path / "small.nii.gz", like=ct)


def test_label_in_another_orientation_of_the_same_grid_is_reoriented(tmp_path):
    ct = make_ct()
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[1, 2, 3] = 4
    ras = Volume.from_sitk(sitk.DICOMOrient(ct.with_array(labels).to_sitk(), "RAS"))
    write_volume(tmp_path / "ras.nii.gz", ras.array, like=ras)
    back = read_label(tmp_path / "ras.nii.gz", like=ct)
    np.testing.assert_array_equal(back.array, labels)
    assert grid_mismatch(back, ct) == []


def test_label_with_fractional_values(tmp_path):
    ct = make_ct()
    write_volume(tmp_path / "prob.nii.gz", np.full(ct.array.shape, 0.5, np.float32), like=ct)
    with pytest.raises(ValueError, match="prob.nii.gz.*integer labels"):
        read_label(tmp_path / "prob.nii.gz", like=ct)


def test_nifti_compression_is_told_by_content_not_name(tmp_path):
    """An uncompressed NIfTI named .nii.gz (ITK reads it) is read; a truncated one is refused clearly."""
    ct = make_ct()
    write_volume(tmp_path / "plain.nii", ct.array, like=ct)
    misnamed = tmp_path / "misnamed.nii.gz"
    misnamed.write_bytes((tmp_path / "plain.nii").read_bytes())
    np.testing.assert_array_equal(read_volume(misnamed).array, ct.array)

    misnamed.write_bytes((tmp_path / "plain.nii").read_bytes()[:-10])
    with pytest.raises(ValueError, match="cannot read the image"):
        read_volume(misnamed)
