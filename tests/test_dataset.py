"""Tests for the dataset format: DatasetWriter, ReferringDataset, SliceDataset and the slice transform."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_core.data.dataset import (
    DatasetWriter,
    ReferringDataset,
    SliceDataset,
    adjacent_slices,
    prepare_mask,
    prepare_slices,
    resize_mask_back,
)
from lsms_core.io import Volume, to_canonical, write_volume

LESION_HU, LIVER_HU, AIR_HU = 20, 100, -1000
SHAPE = (8, 20, 24)
SIZE_SMALL = 16


def make_case(seed: int, orientation: str = "LPS"):
    """A toy CT with a box 'liver' (100 HU) holding two lesions (20 HU), stored in ``orientation``."""
    rng = np.random.default_rng(seed)
    image = np.full(SHAPE, AIR_HU, np.int16)
    organ = np.zeros(SHAPE, np.uint8)
    organ[1:7, 3:17, 2:14] = 1  # on the patient's right (small canonical x)
    image[organ > 0] = LIVER_HU
    lesions = np.zeros(SHAPE, np.uint16)
    z0 = int(rng.integers(1, 3))
    lesions[z0 : z0 + 3, 5:9, 4:8] = 1
    lesions[4:6, 11:14, 9:12] = 2
    image[lesions > 0] = LESION_HU
    volume = Volume(image, spacing=(0.8, 0.8, 2.0), origin=(-10.0, 5.0, 100.0))
    if orientation != "LPS":  # store the same anatomy in another voxel order

        def reorient(array):
            return Volume.from_sitk(sitk.DICOMOrient(volume.with_array(array).to_sitk(), orientation))

        return reorient(image), reorient(lesions).array, reorient(organ).array
    return volume, lesions, organ


def build(root, n_cases=4, **writer_kwargs) -> DatasetWriter:
    writer = DatasetWriter(root, name="toy", description="toy data", license="CC0-1.0", **writer_kwargs)
    for i in range(n_cases):
        image, lesions, organ = make_case(i, "RAS" if i % 2 else "LPS")
        writer.add_case(f"case_{i:02d}", image, lesions, organ)
        writer.add_expressions(
            [
                {"case": f"case_{i:02d}", "expression": "the largest lesion", "targets": [1], "kind": "size"},
                {"case": f"case_{i:02d}", "expression": "both lesions", "targets": [1, 2], "kind": "count"},
                {
                    "case": f"case_{i:02d}",
                    "expression": "the calcified lesion",
                    "targets": [],
                    "kind": "negative",
                },
            ]
        )
    writer.make_splits(seed=0)
    return writer


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "toy"
    build(root)
    return root


# ------------------------------------------------------------------------------------------ writer


def test_writer_layout_and_metadata(toy_root):
    meta = json.loads((toy_root / "dataset.json").read_text())
    assert meta["format"] == "lsms-dataset" and meta["format_version"] == 1
    assert meta["name"] == "toy" and meta["license"] == "CC0-1.0"
    assert meta["organ_labels"] == {"liver": 1}
    for name in ("image.nii.gz", "lesions.nii.gz", "organ.nii.gz", "case.json"):
        assert (toy_root / "cases" / "case_01" / name).is_file()
    lines = (toy_root / "expressions.jsonl").read_text().splitlines()
    assert len(lines) == 12
    ids = [json.loads(line)["id"] for line in lines]
    assert len(set(ids)) == 12 and ids[0] == "case_00-0001"
    assert not list(toy_root.rglob("*.tmp*"))


def test_make_splits_is_deterministic_disjoint_and_complete(tmp_path):
    writer = build(tmp_path / "a", n_cases=5)
    splits = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert all(splits[name] for name in ("train", "val", "test"))
    flat = [c for ids in splits.values() for c in ids]
    assert sorted(flat) == writer.cases and len(flat) == len(set(flat))
    assert writer.make_splits(seed=0) == splits
    assert len(splits["train"]) >= len(splits["val"])


def test_writer_validates_records(tmp_path):
    writer = DatasetWriter(tmp_path / "d", name="d")
    image, lesions, organ = make_case(0)
    writer.add_case("c1", image, lesions, organ)
    good = {"case": "c1", "expression": "x", "targets": [1]}
    with pytest.raises(ValueError, match="unknown case 'nope'"):
        writer.add_expressions([{**good, "case": "nope"}])
    with pytest.raises(ValueError, match=r"targets \[7\] are not lesion ids of case 'c1'"):
        writer.add_expressions([{**good, "targets": [1, 7]}])
    with pytest.raises(ValueError, match="'source' must be one of"):
        writer.add_expressions([{**good, "source": "guess"}])
    with pytest.raises(ValueError, match="non-empty string"):
        writer.add_expressions([{**good, "expression": "  "}])
    with pytest.raises(ValueError, match="duplicate id"):
        writer.add_expressions([{**good, "id": "a"}, {**good, "id": "a"}])
    assert not (tmp_path / "d" / "expressions.jsonl").exists()  # nothing half-written
    with pytest.raises(ValueError, match="shape"):
        writer.add_case("c2", image, lesions[:-1], organ)
    with pytest.raises(ValueError, match="case id"):
        writer.add_case("../evil", image, lesions, organ)
    with pytest.raises(ValueError, match="split 'train' names unknown case 'zz'"):
        writer.write_splits({"train": ["zz"]})


def test_writer_refuses_existing_dataset_unless_exist_ok(toy_root, tmp_path):
    with pytest.raises(ValueError, match="already holds a dataset.*exist_ok=True"):
        DatasetWriter(toy_root, name="again")
    root = tmp_path / "grow"
    build(root, n_cases=3)
    writer = DatasetWriter(root, name="ignored", exist_ok=True)
    writer.add_expressions(
        [{"case": "case_02", "expression": "lesion two", "targets": [2], "source": "human"}]
    )
    ds = ReferringDataset(root)
    assert len(ds.expressions()) == 10
    assert ds.expressions()[-1]["id"] == "case_02-0004"
    assert ds.meta["name"] == "toy"


def test_an_interrupted_case_rewrite_leaves_the_old_case_whole(tmp_path, monkeypatch):
    """Re-adding a case that fails after its new image is written leaves the old case as it was (no
    new image beside the old lesions and case.json); a rewrite that succeeds keeps the case's other
    files (e.g. correction masks) and replaces its own."""
    import lsms_core.data.dataset as dataset_module

    root = tmp_path / "d"
    build(root, n_cases=2)
    case_dir = root / "cases" / "case_01"
    (case_dir / "masks").mkdir()
    (case_dir / "masks" / "m.nii.gz").write_bytes(b"kept")
    before = {f.name: f.read_bytes() for f in case_dir.iterdir() if f.is_file()}
    writer = DatasetWriter(root, name="ignored", exist_ok=True)
    image, lesions, organ = make_case(7, "LPS")
    real_write = dataset_module.write_volume

    def crash_on_lesions(path, array, like):
        if os.path.basename(path) == dataset_module.LESIONS_FILE:
            raise OSError("disk full")
        return real_write(path, array, like=like)

    monkeypatch.setattr(dataset_module, "write_volume", crash_on_lesions)
    with pytest.raises(OSError, match="disk full"):
        writer.add_case("case_01", image, lesions[:, ::-1], organ)
    assert {f.name: f.read_bytes() for f in case_dir.iterdir() if f.is_file()} == before
    assert sorted(p.name for p in (root / "cases").iterdir()) == ["case_00", "case_01"]  # no leftovers
    assert ReferringDataset(root).cases == ["case_00", "case_01"]

    monkeypatch.setattr(dataset_module, "write_volume", real_write)
    writer.add_case("case_01", image, lesions[:, ::-1], organ)
    ds = ReferringDataset(root)
    np.testing.assert_array_equal(ds.load_case("case_01").lesions, lesions[:, ::-1])
    assert (case_dir / "masks" / "m.nii.gz").read_bytes() == b"kept"
    assert sorted(p.name for p in (root / "cases").iterdir()) == ["case_00", "case_01"]


# ------------------------------------------------------------------------------------------ reader


def test_reader_lists_cases_splits_and_expressions(toy_root):
    ds = ReferringDataset(toy_root)
    assert ds.cases == ["case_00", "case_01", "case_02", "case_03"]
    train = ds.split("train")
    assert train and set(train) <= set(ds.cases)
    records = ds.expressions("train")
    assert {r["case"] for r in records} == set(train)
    assert len(ds.expressions()) == 12
    assert ds.split("all") == ds.cases
    with pytest.raises(ValueError, match="no split 'holdout'"):
        ds.split("holdout")


def test_load_case_is_canonical_and_aligned(toy_root):
    ds = ReferringDataset(toy_root)
    reference, lesions_lps, _ = make_case(1)  # case_01 was stored in RAS
    stored = ds.load_case("case_01", canonical=False)
    assert stored.image.direction[0] == -1.0 and stored.image.direction[4] == -1.0  # RAS on disk
    case = ds.load_case("case_01")
    np.testing.assert_allclose(case.image.direction_matrix, np.eye(3))
    np.testing.assert_array_equal(case.image.array, reference.array)
    np.testing.assert_array_equal(case.lesions, lesions_lps)
    assert (case.image.array[case.lesions > 0] == LESION_HU).all()
    assert (case.image.array[(case.organ > 0) & (case.lesions == 0)] == LIVER_HU).all()
    assert case.lesion_ids == [1, 2]
    assert ds.load_case("case_01") is case  # cached


def test_reader_errors(tmp_path, toy_root):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        ReferringDataset(tmp_path)
    root = tmp_path / "broken"
    build(root, n_cases=3)
    lines = (root / "expressions.jsonl").read_text().splitlines()
    (root / "expressions.jsonl").write_text(
        "\n".join([lines[0], lines[1], '{"id": "x", "case":'] + lines[2:])
    )
    with pytest.raises(ValueError, match=r"expressions.jsonl:3: malformed JSON"):
        ReferringDataset(root)
    bad = json.dumps({"id": "y", "case": "case_99", "expression": "a", "targets": []})
    (root / "expressions.jsonl").write_text("\n".join([lines[0], bad]))
    with pytest.raises(ValueError, match=r"expressions.jsonl:2: unknown case 'case_99'"):
        ReferringDataset(root)
    (root / "expressions.jsonl").write_text("\n".join(lines))
    (root / "splits.json").write_text(json.dumps({"train": ["case_00"], "val": ["case_00"]}))
    with pytest.raises(ValueError, match="both 'train' and 'val'"):
        ReferringDataset(root)
    with pytest.raises(ValueError, match="unknown case"):
        ReferringDataset(toy_root).load_case("missing")


def test_mask_records_and_extra_fields(tmp_path):
    root = tmp_path / "corrections"
    writer = DatasetWriter(root, name="corrections")
    image, lesions, organ = make_case(3, "PIR")
    writer.add_case("c", image, lesions, organ)
    drawn = np.zeros(image.array.shape, np.uint8)
    drawn[lesions == 2] = 1
    write_volume(root / "cases" / "c" / "masks" / "m1.nii.gz", drawn, like=image)
    record = {
        "case": "c",
        "expression": "the one I drew",
        "mask": "cases/c/masks/m1.nii.gz",
        "source": "correction",
        "kind": "location",
        "user": "dr. x",
        "model_version": "0.1.0",
    }
    writer.add_expressions([record])
    with pytest.raises(ValueError, match="does not exist"):
        writer.add_expressions([{**record, "mask": "cases/c/masks/none.nii.gz"}])
    ds = ReferringDataset(root)
    (stored,) = ds.expressions()
    assert stored["user"] == "dr. x" and "targets" not in stored
    case = ds.load_case("c")
    np.testing.assert_array_equal(ds.target_mask(stored, case), (case.lesions == 2).astype(np.uint8))
    raw = ds.load_case("c", canonical=False)
    np.testing.assert_array_equal(ds.target_mask(stored, raw), drawn)
    ds.check()
    # Mask records train like lesion records: positives exactly on the drawn lesion's slices.
    data = SliceDataset(ds, "all", image_size=SIZE_SMALL, negatives_fraction=0.5)
    positives = sorted(item[1] for item in data.items if item[2])
    assert positives == sorted(set(np.nonzero(case.lesions == 2)[0].tolist()))
    assert any(not present for _, _, present in data.items)
    for i in range(len(data)):
        item = data[i]
        assert (float(item["mask"].sum()) > 0) == (item["present"] == 1.0)
        assert float(item["distractor"].sum()) == 0  # a drawn mask does not say which lesion it is


def test_fingerprint_tracks_content(tmp_path):
    root = tmp_path / "fp"
    writer = build(root, n_cases=3)
    first = ReferringDataset(root).fingerprint()
    assert first == ReferringDataset(root).fingerprint() and len(first) == 64
    writer.add_expressions([{"case": "case_00", "expression": "new", "targets": [2]}])
    second = ReferringDataset(root).fingerprint()
    assert second != first
    image, lesions, organ = make_case(0)
    lesions[lesions == 2] = 0
    writer.add_case("case_00", image, lesions, organ)
    assert ReferringDataset(root).fingerprint() != second
    # The same content written again later (another "created" time) has the same fingerprint.
    again = tmp_path / "again"
    build(again, n_cases=3).add_expressions([{"case": "case_00", "expression": "new", "targets": [2]}])
    DatasetWriter(again, name="toy", exist_ok=True).add_case("case_00", image, lesions, organ)
    meta = json.loads((again / "dataset.json").read_text())
    (again / "dataset.json").write_text(json.dumps({**meta, "created": "1999-01-01T00:00:00+00:00"}))
    assert ReferringDataset(again).fingerprint() == ReferringDataset(root).fingerprint()
    (again / "dataset.json").write_text(json.dumps({**meta, "name": "other"}))
    assert ReferringDataset(again).fingerprint() != ReferringDataset(root).fingerprint()


def test_import_does_not_pull_torch():
    code = "import sys, lsms_core.data.dataset as d; assert 'torch' not in sys.modules; d.ReferringDataset"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ slices


def test_adjacent_slices_clamp():
    assert adjacent_slices(0, 3, 10) == [0, 0, 1]
    assert adjacent_slices(9, 3, 10) == [8, 9, 9]
    assert adjacent_slices(5, 1, 10) == [5]
    with pytest.raises(ValueError, match="in_slices"):
        adjacent_slices(0, 0, 10)


def test_prepare_slices_pads_to_square_and_inverts():
    hu = np.full((2, 20, 40), -1000.0)
    hu[:, 5:15, 10:30] = 240.0
    out = prepare_slices(hu, 32, (-160, 240))
    assert out.shape == (2, 32, 32) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    # Aspect kept: the 20-row slice fills the middle 16 rows of the square, padding is 0.
    assert out[0, :7].max() == 0 and out[0, -7:].max() == 0
    mask = np.zeros((20, 40), np.float32)
    mask[5:15, 10:30] = 1
    back = resize_mask_back(prepare_slices(mask[None] * 400 - 160, 32, (-160, 240)), (20, 40))
    assert back.shape == (1, 20, 40)
    binary = back[0] >= 0.5
    assert (binary & (mask > 0)).sum() / (binary | (mask > 0)).sum() > 0.85
    same = resize_mask_back(np.ones((3, 40, 40)), (20, 40))
    assert same.shape == (3, 20, 40) and np.allclose(same, 1)


def test_slice_dataset_items(toy_root):
    ds = ReferringDataset(toy_root)
    data = SliceDataset(ds, "all", image_size=32, negatives_fraction=0.25, seed=0)
    assert len(data) > 0
    kinds = {"positive": 0, "presence_negative": 0, "negative": 0}
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        record = next(r for r in ds.expressions() if r["id"] == item["id"])
        assert item["text"] == record["expression"] and item["case"] == record["case"]
        case = ds.load_case(item["case"])
        in_target = np.isin(case.lesions[item["z"]], record["targets"]).any()
        assert item["present"] == float(in_target)
        assert (item["mask"].sum() > 0) == in_target
        if not record["targets"]:
            kinds["negative"] += 1
            assert case.organ[item["z"]].any()  # negatives come from organ slices
        else:
            kinds["positive" if in_target else "presence_negative"] += 1
    assert all(kinds.values()), kinds
    # Deterministic for a seed.
    assert SliceDataset(ds, "all", image_size=32, seed=0).items == data.items


def test_slice_dataset_marks_the_lesions_the_expression_does_not_refer_to(toy_root):
    """``item["distractor"]``: the slice's other lesions, never the target, moved with it when
    augmented; empty for a record with a drawn mask (which lesion it is, is not recorded)."""
    ds = ReferringDataset(toy_root)
    plain = SliceDataset(ds, "all", image_size=32, seed=0)
    augmented = SliceDataset(ds, "all", image_size=32, seed=0, augment=True)
    lesion_value = (LESION_HU + 160) / 400
    marked = 0
    for i in range(len(plain)):
        item, moved = plain[i], augmented[i]
        record = plain.records[plain.items[i][0]]
        lesions = ds.load_case(item["case"]).lesions[item["z"]]
        others = (lesions > 0) & ~np.isin(lesions, record["targets"])
        expected = prepare_mask(others, 32) * (1 - item["mask"].numpy())
        np.testing.assert_array_equal(item["distractor"].numpy(), expected)
        inside = item["image"][0][item["distractor"][0] > 0]
        assert np.allclose(inside.numpy(), lesion_value, atol=0.1)  # on a lesion
        assert moved["distractor"].shape == moved["mask"].shape
        assert float((moved["distractor"] * moved["mask"]).sum()) == 0  # never the target
        if item["distractor"].sum() > 0:  # moved a little with the image, never mirrored
            marked += 1
            xa = np.nonzero(item["distractor"][0].numpy())[1].mean()
            xb = np.nonzero(moved["distractor"][0].numpy())[1].mean()
            assert abs(xa - xb) < 4
    # "the largest lesion" on lesion 2's slices and the negative expression on lesion slices.
    assert 0 < marked < len(plain)
    both = [i for i, item in enumerate(plain.items) if plain.records[item[0]]["targets"] == [1, 2]]
    assert both and all(plain[i]["distractor"].sum() == 0 for i in both)


def test_slice_dataset_stacks_adjacent_canonical_slices(toy_root):
    ds = ReferringDataset(toy_root)
    data = SliceDataset(ds, "all", in_slices=3, image_size=24, slice_sampling="all")
    assert len(data) == len(ds.expressions()) * SHAPE[0]
    item = data[0]  # z = 0: the stack is slices (0, 0, 1)
    case = ds.load_case(item["case"])
    expected = prepare_slices(case.image.array[[0, 0, 1]], 24, (-160, 240))
    np.testing.assert_allclose(item["image"].numpy(), expected)


def test_slice_dataset_mask_matches_image_and_augmentation_keeps_sides(toy_root):
    ds = ReferringDataset(toy_root)
    plain = SliceDataset(ds, "all", image_size=24)
    augmented = SliceDataset(ds, "all", image_size=24, augment=True, seed=3)
    lesion_value = (LESION_HU + 160) / 400
    for i in range(len(plain)):
        a, b = plain[i], augmented[i]
        if a["present"] != 1.0:
            continue
        inside = a["image"][0][a["mask"][0] > 0]
        assert np.allclose(inside.numpy(), lesion_value, atol=0.05)
        # Augmentation moves things a little but never mirrors them.
        xa = np.nonzero(a["mask"][0].numpy())[1].mean()
        xb = np.nonzero(b["mask"][0].numpy())[1].mean()
        assert abs(xa - xb) < 4
        assert b["text"] == a["text"]
        assert not np.array_equal(a["image"].numpy(), b["image"].numpy())


def test_slice_dataset_batches_with_dataloader(toy_root):
    from torch.utils.data import DataLoader, Dataset

    data = SliceDataset(toy_root, "train", image_size=16)
    assert isinstance(data, Dataset)
    batch = next(iter(DataLoader(data, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 1, 16, 16) and len(batch["text"]) == 4
    with pytest.raises(ValueError, match="slice_sampling"):
        SliceDataset(toy_root, "train", slice_sampling="random")


def test_lesion_side_in_canonical_slices(toy_root):
    # The toy liver sits at small x in LPS (patient's right): true for RAS-stored cases too.
    ds = ReferringDataset(toy_root)
    for case_id in ds.cases:
        case = ds.load_case(case_id)
        assert np.nonzero(case.organ)[2].mean() < SHAPE[2] / 2
        raw = ds.load_case(case_id, canonical=False)
        np.testing.assert_array_equal(to_canonical(raw.image).array, case.image.array)


def test_slice_dataset_repeats_the_items_where_another_lesion_shares_the_slice(toy_root):
    from lsms_core.data.dataset import other_lesion_on_slice

    ds = ReferringDataset(toy_root)
    once = SliceDataset(ds, "all", image_size=32, seed=0)
    thrice = SliceDataset(ds, "all", image_size=32, seed=0, crowded_repeat=3)

    def crowded(item) -> bool:
        record = once.records[item[0]]
        return other_lesion_on_slice(item[1], record["targets"], ds.case_info(record["case"])["lesions"])

    counts = collections.Counter(thrice.items)
    assert set(counts) == set(once.items)  # the same items, only repeated
    repeated = [item for item in once.items if crowded(item)]
    # The toy cases hold such items: positives of "the largest lesion" on lesion 2's slices, and
    # the negative expression's slices that show a lesion.
    assert repeated and any(item[2] for item in repeated) and len(repeated) < len(once.items)
    assert all(counts[item] == (3 if crowded(item) else 1) for item in once.items)
    assert len(thrice) == len(once) + 2 * len(repeated)
    with pytest.raises(ValueError, match="crowded_repeat"):
        SliceDataset(ds, "all", image_size=32, crowded_repeat=0)


def test_slice_dataset_can_leave_out_what_only_the_volume_decides(tmp_path):
    """On a slice showing both toy lesions, "the largest"/"the smallest lesion" are decided by the
    lesions' areas there (lesion 1 is the larger on every slice), "the upper lesion" only by the
    volume: only its items on those slices are left out."""
    writer = DatasetWriter(tmp_path / "q", name="q", license="CC0-1.0")
    for i in range(4):
        case = f"case_{i:02d}"
        writer.add_case(case, *make_case(i, "RAS" if i % 2 else "LPS"))
        writer.add_expressions(
            [
                {
                    "case": case,
                    "expression": "the largest lesion",
                    "targets": [1],
                    "query": {"filters": {}, "selector": "largest"},
                },
                {
                    "case": case,
                    "expression": "the smallest lesion",
                    "targets": [2],
                    "query": {"filters": {}, "selector": "smallest"},
                },
                {
                    "case": case,
                    "expression": "the upper lesion",
                    "targets": [2],
                    "query": {"filters": {"vertical": "superior"}, "selector": "the"},
                },
                {"case": case, "expression": "both lesions", "targets": [1, 2]},
            ]
        )
    writer.write_splits({"train": writer.cases})
    every = SliceDataset(tmp_path / "q", "train", image_size=32, seed=0)
    decidable = SliceDataset(tmp_path / "q", "train", image_size=32, seed=0, decidable_only=True)

    def left_out(item) -> bool:
        record = every.records[item[0]]
        return (
            item[2]
            and record["expression"] == "the upper lesion"
            and every.shows_other_lesion(record, item[1])
        )

    assert any(left_out(item) for item in every.items)
    assert decidable.items == [item for item in every.items if not left_out(item)]
    deciders = {
        (every.records[i]["expression"], every.dataset.decided_on_slice(every.records[i], z))
        for i, z, present in every.items
        if present and every.shows_other_lesion(every.records[i], z)
    }
    assert deciders == {
        ("the largest lesion", "in-plane words + areas on the slice"),
        ("the smallest lesion", "in-plane words + areas on the slice"),
        ("the upper lesion", "only the volume"),
    }  # "both lesions" means every lesion shown: no other lesion to tell apart


def test_slice_dataset_maps_each_lesion_type_on_the_slice(tmp_path):
    """``appearance_classes``: one map per type, marking every lesion of that type on the slice
    (targets and others alike), moved with the image and its mask when augmented."""
    from tests._datasets import make_tiny_dataset

    classes = ("cyst", "metastasis", "hypervascular")  # tiny data: lesion 1 (dark) cyst, 2 hypervascular
    ds = ReferringDataset(make_tiny_dataset(tmp_path / "typed", cases=2, lesion_types=True))
    plain = SliceDataset(ds, "all", image_size=32, appearance_classes=classes)
    augmented = SliceDataset(ds, "all", image_size=32, appearance_classes=classes, augment=True, seed=3)
    assert ds.lesion_kinds("case00") == {1: "cyst", 2: "hypervascular"}
    typed = 0
    for i in range(len(plain)):
        item, moved = plain[i], augmented[i]
        lesions = ds.load_case(item["case"]).lesions[item["z"]]
        maps = item["appearance"].numpy()
        assert maps.shape == (3, 32, 32)
        np.testing.assert_array_equal(maps[0], prepare_mask(lesions == 1, 32)[0])
        np.testing.assert_array_equal(maps[2], prepare_mask(lesions == 2, 32)[0])
        assert maps[1].sum() == 0  # no metastasis in this data
        image = item["image"][0].numpy()
        if maps[0].any() and maps[2].any():
            typed += 1
            assert image[maps[0] > 0].mean() < image[maps[2] > 0].mean()  # the cyst is the dark one
        targets = plain.records[plain.items[i][0]]["targets"]
        if item["present"] and targets == [1]:  # the target's own type map moves with its mask
            np.testing.assert_array_equal(moved["appearance"][0].numpy(), moved["mask"][0].numpy())
    assert typed > 0
    # without recorded types every map is empty; without classes there are no maps
    untyped = ReferringDataset(make_tiny_dataset(tmp_path / "untyped", cases=2))
    assert untyped.lesion_kinds("case00") == {}
    items = SliceDataset(untyped, "all", image_size=32, appearance_classes=classes)
    assert all(items[i]["appearance"].sum() == 0 for i in range(len(items)))
    assert "appearance" not in SliceDataset(untyped, "all", image_size=32)[0]
