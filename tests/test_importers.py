"""Importers: tiny LiTS-, MSD- and nnU-Net-shaped folders become valid LSMS datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lsms_core.data.dataset import ReferringDataset
from lsms_core.data.expressions import lesion_attributes, resolve
from lsms_core.data.importers import detect_layout, find_cases, import_dataset, label_ids, split_instances

SHAPE = (24, 32, 32)  # (z, y, x)
SPACING_XYZ = (1.5, 1.2, 2.0)
RAS_FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # as many NIfTI writers store CT
PERMUTED = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0)  # index axes not along x, y, z at all
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Tumour blobs (centre (z, y, x) voxel, radius in voxels, HU) and a speck below min_lesion_voxels.
BLOBS = [((12, 14, 9), 3.2, 10.0), ((10, 18, 22), 2.2, 130.0)]
SPECK = (slice(17, 18), slice(9, 10), slice(15, 17))  # 2 voxels


def make_arrays(seed: int = 0):
    """CT (HU) and label map (1 liver, 2 tumour) as (z, y, x) arrays, plus the blob masks."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-100.0, 5.0, SHAPE).astype(np.int16)
    label = np.zeros(SHAPE, np.uint8)
    label[4:21, 6:27, 4:29] = 1
    hu[label == 1] = rng.normal(60.0, 5.0, int((label == 1).sum()))
    grid = np.indices(SHAPE)
    blobs = []
    for centre, radius, value in BLOBS:
        blob = sum((grid[a] - centre[a]) ** 2 for a in range(3)) <= radius**2
        label[blob] = 2
        hu[blob] = value
        blobs.append(blob)
    label[SPECK] = 2
    return hu, label, blobs


def write_image(path, array, direction=IDENTITY, spacing=SPACING_XYZ, origin=(-20.0, 15.0, 100.0)):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def write_case(image_path, label_path, direction=IDENTITY, seed=0):
    hu, label, blobs = make_arrays(seed)
    write_image(image_path, hu, direction)
    write_image(label_path, label, direction)
    return hu, label, blobs


@pytest.fixture()
def lits_dir(tmp_path):
    src = tmp_path / "LiTS"
    truth = {}
    for n, folder, direction in [
        (0, "Training Batch 1", IDENTITY),
        (1, "Training Batch 1", RAS_FLIP),
        (12, "Training Batch 2", IDENTITY),
    ]:
        truth[f"lits_{n:03d}"] = (
            direction,
            *write_case(
                src / folder / f"volume-{n}.nii", src / folder / f"segmentation-{n}.nii", direction, seed=n
            ),
        )
    return src, truth


@pytest.fixture()
def msd_dir(tmp_path):
    src = tmp_path / "Task03_Liver"
    truth = {}
    for n, direction in [(0, RAS_FLIP), (3, IDENTITY)]:
        truth[f"liver_{n}"] = (
            direction,
            *write_case(
                src / "imagesTr" / f"liver_{n}.nii.gz",
                src / "labelsTr" / f"liver_{n}.nii.gz",
                direction,
                seed=n,
            ),
        )
    write_image(src / "imagesTs" / "liver_9.nii.gz", make_arrays()[0])  # test image: no label, ignored
    (src / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    meta = {
        "name": "Liver",
        "licence": "CC-BY-SA 4.0",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": [
            {"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"} for n in (0, 3)
        ],
    }
    (src / "dataset.json").write_text(json.dumps(meta))
    return src, truth


@pytest.fixture()
def nnunet_dir(tmp_path):
    src = tmp_path / "Dataset042_LiverLesions"
    truth = {}
    for case, direction in [("ABC_001", PERMUTED), ("ABC_002", IDENTITY)]:
        truth[case] = (
            direction,
            *write_case(
                src / "imagesTr" / f"{case}_0000.nii.gz",
                src / "labelsTr" / f"{case}.nii.gz",
                direction,
                seed=len(case) + int(case[-1]),
            ),
        )
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "lesion": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (src / "dataset.json").write_text(json.dumps(meta))
    return src, truth


def check_imported(out, truth):
    """Cases, instances, organ, geometry and expressions of an imported dataset."""
    ds = ReferringDataset(out)
    assert ds.cases == sorted(truth)
    assert sorted(c for s in ds.splits.values() for c in s) == sorted(truth)  # case-level, complete
    records = ds.expressions()
    for case_id, (direction, hu, label, blobs) in truth.items():
        case = ds.load_case(case_id, canonical=False)
        # Geometry and intensities preserved exactly.
        np.testing.assert_array_equal(case.image.array, hu)
        assert case.image.direction == pytest.approx(direction)
        assert case.image.spacing == pytest.approx(SPACING_XYZ)
        # One instance per blob (the speck is dropped), largest first, covering the blob exactly.
        assert case.lesion_ids == [1, 2]
        for lesion_id, blob in enumerate(blobs, start=1):
            np.testing.assert_array_equal(case.lesions == lesion_id, blob)
        np.testing.assert_array_equal(case.organ > 0, label > 0)

        # Expressions: targets exist, and each query resolves to its targets on the canonical case
        # (a wrong orientation would swap left and right and break this).
        canonical = ds.load_case(case_id, canonical=True)
        attrs = lesion_attributes(
            canonical.image.array, canonical.lesions, canonical.organ, canonical.image.scale
        )
        case_records = [r for r in records if r["case"] == case_id]
        assert case_records, case_id
        assert {r["kind"] for r in case_records} >= {"negative", "all"}
        for r in case_records:
            assert set(r["targets"]) <= {1, 2}
            assert resolve(r["query"], attrs) == set(r["targets"]), r
            np.testing.assert_array_equal(ds.target_mask(r, case) > 0, np.isin(case.lesions, r["targets"]))
    return ds, records


def test_split_instances_orders_by_size_and_drops_specks():
    mask = np.zeros((6, 10, 10), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[2:5, 5:9, 5:9] = True  # 48 voxels
    mask[5, 0, 0] = True  # 1 voxel
    mask[4, 4, 4] = True  # touches the big block diagonally only: same lesion with 26-connectivity
    out = split_instances(mask, min_voxels=5)
    assert out.max() == 2 and out[3, 6, 6] == 1 and out[1, 1, 1] == 2 and out[4, 4, 4] == 1
    assert out[5, 0, 0] == 0 and (out[mask] > 0).sum() == mask.sum() - 1


def test_label_ids_by_name():
    assert label_ids({"0": "background", "1": "liver", "2": "cancer"}, "x") == ((1,), (2,))
    assert label_ids({"background": 0, "Liver": 1, "Tumor": 2}, "x") == ((1,), (2,))
    # A "liver tumour" label is a tumour label; region-based liver [1, 2] keeps only the pure liver id.
    assert label_ids({"background": 0, "liver": [1, 2], "liver tumour": 2}, "x") == ((1,), (2,))
    assert label_ids({"background": 0, "liver": 1, "metastasis": 2, "hcc": 3}, "x") == ((1,), (2, 3))
    assert label_ids(None, "x", default=True) == ((1,), (2,))
    with pytest.raises(ValueError, match="no tumour label among the labels"):
        label_ids({"background": 0, "liver": 1, "spleen": 2}, "ds/dataset.json")


def test_import_lits(lits_dir, tmp_path):
    src, truth = lits_dir
    assert detect_layout(src) == "lits"
    calls = []
    out = import_dataset(
        src, tmp_path / "out", seed=3, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    ds, records = check_imported(out, truth)
    assert ds.meta["provenance"]["source_layout"] == "lits" and "LiTS" in ds.meta["license"]
    # Deterministic for a seed.
    again = import_dataset(src, tmp_path / "again", seed=3)
    assert ReferringDataset(again).expressions() == records
    assert ReferringDataset(again).splits == ds.splits


def test_import_msd(msd_dir, tmp_path):
    src, truth = msd_dir
    assert detect_layout(src) == "msd"
    out = import_dataset(src, tmp_path / "out")
    ds, _ = check_imported(out, truth)
    assert ds.meta["license"] == "CC-BY-SA 4.0"


def test_import_nnunet(nnunet_dir, tmp_path):
    src, truth = nnunet_dir
    assert detect_layout(src) == "nnunet"
    assert [c.case_id for c in find_cases(src, "nnunet")] == ["ABC_001", "ABC_002"]
    check_imported(import_dataset(src, tmp_path / "out", kind="nnunet"), truth)


def test_errors_name_the_folder(tmp_path, lits_dir, nnunet_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*the folder is empty"):
        import_dataset(empty, tmp_path / "o1")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        import_dataset(tmp_path / "missing", tmp_path / "o1")
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="other: unknown dataset layout"):
        import_dataset(other, tmp_path / "o1")
    with pytest.raises(ValueError, match="kind must be"):
        import_dataset(other, tmp_path / "o1", kind="kits")

    src, _ = lits_dir
    (src / "Training Batch 2" / "segmentation-12.nii").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) have no label map: .*volume-12\.nii"):
        import_dataset(src, tmp_path / "o2")
    hu, label, _ = make_arrays()
    write_image(src / "Training Batch 2" / "segmentation-12.nii", label, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"segmentation-12\.nii: the label map does not lie on the grid"):
        import_dataset(src, tmp_path / "o3")
    # Nothing half-written is left behind, and once the data is fixed the same command works.
    assert not (tmp_path / "o3").exists() and not list(tmp_path.glob(".o3.*"))
    write_image(src / "Training Batch 2" / "segmentation-12.nii", label)
    assert len(ReferringDataset(import_dataset(src, tmp_path / "o3")).cases) == 3
    with pytest.raises(ValueError, match="o3: already holds a dataset"):
        import_dataset(src, tmp_path / "o3")

    nn_src, _ = nnunet_dir
    (nn_src / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    with pytest.raises(ValueError, match="dataset.json: no tumour label"):
        import_dataset(nn_src, tmp_path / "o4")


@pytest.mark.parametrize("layout", ["lits", "msd"])
def test_cli_data_import_converts_lits_and_msd_folders(layout, lits_dir, msd_dir, tmp_path, capsys):
    from lsms_core.cli import main

    src, truth = lits_dir if layout == "lits" else msd_dir
    out = tmp_path / f"{layout}_out"
    assert main(["data", "import", str(src), str(out), "--kind", "auto"]) == 0
    assert str(out) in capsys.readouterr().out
    check_imported(out, truth)


def test_cli_data_synth_phantoms_only_writes_a_valid_dataset(tmp_path):
    from lsms_core.cli import main

    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--cases", "3", "--seed", "1", "--phantom-fraction", "1.0"]) == 0
    dataset = ReferringDataset(out)
    assert len(dataset.cases) == 3
    assert all(dataset.split(name) for name in ("train", "val", "test"))
    records = dataset.expressions()
    assert records and {r["case"] for r in records} <= set(dataset.cases)
