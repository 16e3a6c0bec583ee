"""The corrections dataset: records, never-overwrite, crash safety, permission errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lsms_core.data.corrections import CorrectionsDataset, assign_splits
from lsms_core.data.dataset import ReferringDataset
from lsms_core.io import Volume, read_volume


def _volume(seed: int = 0, shape=(4, 24, 20)) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-200, 300, size=shape).astype(np.int16)
    return Volume(array, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 5.0, 30.0), path=f"/data/ct{seed}.nii.gz")


def _masks(shape=(4, 24, 20)):
    model = np.zeros(shape, np.uint8)
    model[1:3, 5:12, 4:10] = 1  # 2*7*6 = 84 voxels
    corrected = model.copy()
    corrected[1:3, 5:12, 10:12] = 1  # +28 voxels the model missed
    corrected[1, 5, 4] = 0  # -1 false positive
    return model, corrected


def _snapshot(root):
    """Bytes of every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_writes_a_valid_record(tmp_path):
    ds = CorrectionsDataset(tmp_path / "corr")
    assert len(ds) == 0 and not (tmp_path / "corr").exists()
    image = _volume()
    model, corrected = _masks()

    record = ds.add(image, "  the small lesion in segment vii ", model, corrected, model_version="v1")

    assert len(ds) == 1
    meta = json.loads((ds.root / "dataset.json").read_text())
    assert meta["format"] == "lsms-dataset"
    assert meta["name"] == "corrections" and meta["source"] == "correction"
    assert record["expression"] == "the small lesion in segment vii"
    assert record["source"] == "correction" and record["kind"] == "correction"
    assert record["model_version"] == "v1" and record["image_ref"] == "/data/ct0.nii.gz"
    assert record["changed_voxels"] == 29
    assert record["mask"] == f"cases/{record['case']}/masks/{record['id']}_corrected.nii.gz"
    assert ds.records() == [record]

    # The folder is a valid LSMS dataset: the reader and the training target agree with the record.
    referring = ReferringDataset(ds.root)
    assert referring.expressions() == [record]
    assert referring.split("train") == [record["case"]] and referring.split("val") == []
    case = referring.load_case(record["case"], canonical=False)
    np.testing.assert_array_equal(referring.target_mask(record, case), corrected)

    stored = read_volume(ds.root / "cases" / record["case"] / "image.nii.gz")
    np.testing.assert_array_equal(stored.array, image.array)
    np.testing.assert_allclose(stored.spacing, image.spacing)
    np.testing.assert_allclose(stored.origin, image.origin)
    for key, expected in (("mask", corrected), ("model_mask", model)):
        mask = read_volume(ds.root / record[key])
        np.testing.assert_array_equal(mask.array, expected)
        np.testing.assert_allclose(mask.spacing, image.spacing)


def test_same_image_is_stored_once_and_records_never_overwrite(tmp_path):
    ds = CorrectionsDataset(tmp_path)
    image = _volume()
    model, corrected = _masks()
    first = ds.add(image, "the lesion", model, corrected, model_version="v1")
    before = _snapshot(tmp_path)
    # Same image (a copy), even the same description and masks: a second, separate record.
    second = ds.add(Volume(image.array.copy(), image.spacing, image.origin), "the lesion", model, model,
                    model_version="v1")  # fmt: skip
    other = ds.add(_volume(seed=1), "a large mass", model, corrected, model_version="v2")

    assert first["case"] == second["case"] != other["case"]
    assert len({first["id"], second["id"], other["id"]}) == 3
    assert second["changed_voxels"] == 0
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == sorted({first["case"], other["case"]})
    after = _snapshot(tmp_path)
    for name, data in before.items():  # every earlier file is untouched ...
        if name in ("expressions.jsonl", "splits.json"):
            continue
        assert after[name] == data, name
    # ... and the earlier jsonl lines are kept byte for byte.
    assert after["expressions.jsonl"].startswith(before["expressions.jsonl"])
    assert [r["id"] for r in ds.records()] == [first["id"], second["id"], other["id"]]
    splits = ReferringDataset(tmp_path).splits
    assert sorted(splits["train"] + splits["val"]) == sorted({first["case"], other["case"]})
    assert len(splits["val"]) == 1 and len(splits["train"]) == 1  # two images: one is held out
    assert ds.splits() == splits
    held_out = ds.split_records("val")
    assert held_out and all(r["case"] == splits["val"][0] for r in held_out)


def test_splits_are_deterministic_and_hold_out_about_a_fifth():
    ids = [f"{i:016x}" for i in range(400)]
    splits = assign_splits(ids)
    assert splits == assign_splits(list(reversed(ids)))  # order-independent
    assert sorted(splits["train"] + splits["val"]) == sorted(ids) and splits["test"] == []
    assert 0.12 < len(splits["val"]) / len(ids) < 0.28
    # Growing the dataset never moves an existing case (once the minimums are met).
    grown = assign_splits(ids + [f"new{i:013x}" for i in range(50)])
    assert set(splits["val"]) <= set(grown["val"])
    assert assign_splits(["only"]) == {"train": ["only"], "val": [], "test": []}
    for pair in (["a", "b"], ["c", "d"], ["e", "f"]):
        two = assign_splits(pair)
        assert len(two["val"]) == 1 and len(two["train"]) == 1


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4, 5, 6, 7])
def test_crash_mid_save_leaves_the_dataset_valid(tmp_path, monkeypatch, crash_at):
    ds = CorrectionsDataset(tmp_path)
    model, corrected = _masks()
    old = [ds.add(_volume(seed), f"lesion {seed}", model, corrected, model_version="v1") for seed in (0, 1)]
    old_lines = (tmp_path / "expressions.jsonl").read_bytes()

    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    # A new image: image, lesions, case.json, two masks, jsonl, splits = 7 atomic replaces.
    with pytest.raises(OSError, match="simulated crash"):
        ds.add(_volume(seed=7), "the new lesion", model, corrected, model_version="v1")
    monkeypatch.setattr(os, "replace", real_replace)

    assert calls["n"] == crash_at
    records = ReferringDataset(tmp_path).expressions()  # opens and validates
    if crash_at <= 6:  # crashed before the jsonl was replaced: exactly the old records
        assert records == old
        assert (tmp_path / "expressions.jsonl").read_bytes() == old_lines
    else:  # crashed after: the record is in, only splits.json is stale (recomputed when read)
        assert records[:2] == old and len(records) == 3
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    for record in records:
        assert (tmp_path / record["mask"]).is_file() and (tmp_path / record["model_mask"]).is_file()
    # The dataset keeps working after the crash.
    ds.add(_volume(seed=7), "the new lesion", model, corrected, model_version="v1")
    assert len(CorrectionsDataset(tmp_path)) == len(records) + 1


def test_unwritable_folder_is_reported_before_writing(tmp_path, monkeypatch):
    target = tmp_path / "readonly" / "corr"
    (tmp_path / "readonly").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode, **kw: False if "readonly" in str(path) else real_access(path, mode, **kw),
    )
    model, corrected = _masks()
    with pytest.raises(ValueError, match="no write permission"):
        CorrectionsDataset(target).add(_volume(), "lesion", model, corrected, model_version="v1")
    assert list((tmp_path / "readonly").iterdir()) == []


def test_probe_failure_is_reported(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    model, corrected = _masks()
    with pytest.raises(ValueError, match="cannot write there"):
        CorrectionsDataset(tmp_path / "corr").add(_volume(), "lesion", model, corrected, model_version="v1")
    assert not (tmp_path / "corr" / "expressions.jsonl").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_folder_with_chmod(tmp_path):
    folder = tmp_path / "corr"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        model, corrected = _masks()
        with pytest.raises(ValueError, match="write"):
            CorrectionsDataset(folder).add(_volume(), "lesion", model, corrected, model_version="v1")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"model_mask": np.zeros((4, 24, 21), np.uint8)}, "model_mask: shape"),
        ({"corrected_mask": np.zeros((24, 20), np.uint8)}, "corrected_mask: shape"),
        ({"description": "   "}, "description"),
    ],
)
def test_bad_input_raises_before_writing(tmp_path, bad, message):
    model, corrected = _masks()
    kwargs = {"description": "lesion", "model_mask": model, "corrected_mask": corrected, **bad}
    with pytest.raises(ValueError, match=message):
        CorrectionsDataset(tmp_path / "corr").add(_volume(), model_version="v1", **kwargs)
    assert not (tmp_path / "corr").exists()


def test_refuses_to_add_to_another_dataset(tmp_path):
    from lsms_core.data.dataset import DatasetWriter

    image, (model, corrected) = _volume(), _masks()
    writer = DatasetWriter(tmp_path / "bench", name="bench")
    writer.add_case("case_0", image, corrected)
    writer.write_splits({"train": ["case_0"], "val": [], "test": []})
    before = _snapshot(tmp_path / "bench")
    with pytest.raises(ValueError, match="not a corrections dataset"):
        CorrectionsDataset(tmp_path / "bench").add(image, "lesion", model, corrected, model_version="v1")
    assert _snapshot(tmp_path / "bench") == before


# ---------------------------------------------------------------------------------------------
# Partial-scope corrections (reviewed slices) and replacing a description's earlier correction
# ---------------------------------------------------------------------------------------------

_Z_FLIPPED = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # slice index grows toward the feet
_SAGITTAL = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # the array's first axis is left-right


def test_canonical_slice_range_maps_input_slices_to_canonical_ones():
    from lsms_core.data.corrections import canonical_slice_range

    axial = _volume(shape=(10, 6, 5))
    assert canonical_slice_range(axial, None) is None
    assert canonical_slice_range(axial, (0, 10)) is None  # the whole volume: no restriction
    assert canonical_slice_range(axial, (2, 5)) == [2, 4]  # z1 exclusive in, inclusive out
    assert canonical_slice_range(axial, (7, 8)) == [7, 7]
    flipped = Volume(axial.array, axial.spacing, axial.origin, direction=_Z_FLIPPED)
    assert canonical_slice_range(flipped, (2, 5)) == [5, 7]  # canonical z runs the other way
    sagittal = Volume(axial.array, axial.spacing, axial.origin, direction=_SAGITTAL)
    assert canonical_slice_range(sagittal, None) is None
    with pytest.raises(ValueError, match="not axial"):
        canonical_slice_range(sagittal, (2, 5))
    for bad in ((3, 3), (-1, 2), (0, 11)):
        with pytest.raises(ValueError, match="0 <= z0 < z1"):
            canonical_slice_range(axial, bad)


@pytest.mark.parametrize("direction, expected", [(None, [2, 4]), (_Z_FLIPPED, [5, 7])])
def test_partial_scope_record_keeps_negatives_inside_the_reviewed_slices(tmp_path, direction, expected):
    from lsms_core.data.dataset import SliceDataset

    shape = (10, 24, 20)
    base = _volume(shape=shape)
    image = base if direction is None else Volume(base.array, base.spacing, base.origin, direction=direction)
    model = np.zeros(shape, np.uint8)
    model[3, 5:12, 4:10] = 1  # input slice 3, inside the reviewed input slices 2..4
    ds = CorrectionsDataset(tmp_path)
    record = ds.add(image, "the lesion", model, model, model_version="v1", slices=(2, 5))
    assert record["slices"] == expected
    assert ReferringDataset(tmp_path).expressions()[0]["slices"] == expected  # valid dataset field
    # Every "absent" slice training draws lies in the reviewed range; slices outside it were never
    # looked at, so they must not teach that the lesion is absent there.
    split = "train" if record["case"] in ds.splits()["train"] else "val"  # one image: either
    items = SliceDataset(tmp_path, split, image_size=16, negatives_fraction=0.9).items
    absent = sorted(z for _, z, present in items if not present)
    present = sorted(z for _, z, present in items if present)
    canonical_lesion = 3 if direction is None else 6
    assert present == [canonical_lesion]
    assert absent and all(expected[0] <= z <= expected[1] for z in absent), absent
    assert sorted(absent + present) == list(range(expected[0], expected[1] + 1))
    # A correction over all slices has no range: absent slices may come from anywhere.
    whole = ds.add(image, "another lesion", model, model, model_version="v1")
    assert "slices" not in whole


def test_replacing_a_partial_correction_keeps_every_reviewed_range(tmp_path):
    """One description reviewed in two pieces: its record covers both, and only those slices."""
    from lsms_core.data.dataset import SliceDataset

    shape = (12, 24, 20)
    image = _volume(shape=shape)
    mask = np.zeros(shape, np.uint8)
    mask[3, 5:12, 4:10] = 1  # seen in the first piece, slices 2..4
    ds = CorrectionsDataset(tmp_path)
    ds.add(image, "the lesion", mask, mask, model_version="v1", slices=(2, 5))
    mask[9, 5:12, 4:10] = 1  # the same description, segmented again on slices 8..10
    second = ds.add(image, "the lesion", mask, mask, model_version="v1", slices=(8, 11), replace=True)
    assert second["slices"] == [[2, 4], [8, 10]]
    [record] = ReferringDataset(tmp_path).expressions()
    assert record["slices"] == [[2, 4], [8, 10]]  # a valid dataset field
    split = "train" if record["case"] in ds.splits()["train"] else "val"
    items = SliceDataset(tmp_path, split, image_size=16, negatives_fraction=0.9).items
    absent = sorted(z for _, z, present in items if not present)
    assert sorted(absent + [z for _, z, present in items if present]) == [2, 3, 4, 8, 9, 10]

    # a third piece touching the second merges into one range; "all slices" lifts the restriction
    third = ds.add(image, "the lesion", mask, mask, model_version="v1", slices=(5, 8), replace=True)
    assert third["slices"] == [2, 10]
    whole = ds.add(image, "the lesion", mask, mask, model_version="v1", replace=True)
    assert "slices" not in whole
    again = ds.add(image, "the lesion", mask, mask, model_version="v1", slices=(2, 5), replace=True)
    assert "slices" not in again  # everything was reviewed before


def test_slices_field_forms():
    from lsms_core.data.dataset import slice_ranges, union_slice_ranges

    assert slice_ranges([2, 4]) == [(2, 4)]
    assert slice_ranges([[8, 9], [2, 4]]) == [(8, 9), (2, 4)]
    for bad in ([4, 2], [2], [], [[2, 4], [5]], [[2, 4], 7], [True, 3], "2:4"):
        with pytest.raises(ValueError, match="'slices' must be"):
            slice_ranges(bad)
    assert union_slice_ranges([2, 4], [[6, 7], [3, 5]]) == [2, 7]
    assert union_slice_ranges([2, 4], [9, 9]) == [[2, 4], [9, 9]]
    assert union_slice_ranges([2, 4], None) is None


def test_partial_scope_on_a_sagittal_image_is_refused_before_writing(tmp_path):
    base = _volume(shape=(10, 24, 20))
    sagittal = Volume(base.array, base.spacing, base.origin, direction=_SAGITTAL)
    model = np.zeros(base.array.shape, np.uint8)
    with pytest.raises(ValueError, match="segment all slices"):
        CorrectionsDataset(tmp_path / "corr").add(
            sagittal, "lesion", model, model, model_version="v1", slices=(1, 3)
        )
    assert not (tmp_path / "corr").exists()


def test_replace_drops_the_earlier_record_of_the_same_image_and_description(tmp_path):
    ds = CorrectionsDataset(tmp_path)
    model, corrected = _masks()
    first = ds.add(_volume(), "the lesion", model, corrected, model_version="v1")
    other_image = ds.add(_volume(seed=1), "the lesion", model, corrected, model_version="v1")
    other_text = ds.add(_volume(), "a cyst", model, corrected, model_version="v1")
    kept_lines = [
        line for line in (tmp_path / "expressions.jsonl").read_bytes().splitlines(keepends=True)
        if json.loads(line)["id"] != first["id"]
    ]  # fmt: skip

    again = ds.add(_volume(), "  The LESION ", model, model, model_version="v2", replace=True)

    assert again["replaces"] == [first["id"]] and again["changed_voxels"] == 0
    assert [r["id"] for r in ds.records()] == [other_image["id"], other_text["id"], again["id"]]
    # the other records' lines are kept byte for byte; the replaced record's masks are gone
    assert (tmp_path / "expressions.jsonl").read_bytes().startswith(b"".join(kept_lines))
    assert not (tmp_path / first["mask"]).exists() and not (tmp_path / first["model_mask"]).exists()
    assert (tmp_path / again["mask"]).is_file()
    ReferringDataset(tmp_path).check()
    # without replace (the default) a second record is added, as before
    ds.add(_volume(), "the lesion", model, corrected, model_version="v2")
    assert len(ds) == 4
