"""Tests for the external 2D readers (LViT layout, RefHL-Seg-style lists) on tiny fake folders."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_core.data.external import LViTDataset, RefListDataset, read_slice_image, read_slice_mask

SIZE = 16


def write_png(path, array: np.ndarray, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.stack([array] * 3, -1) if rgb else array, isVector=rgb)
    sitk.WriteImage(img, str(path))


def picture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 12x20 uint8 picture with a bright square and its 0/255 mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(12, 20)).astype(np.uint8)
    mask = np.zeros((12, 20), np.uint8)
    mask[3:8, 4 + seed : 10 + seed] = 255
    image[mask > 0] = 250
    return image, mask


def make_lvit(root, split="Train", n=3, table="csv", mask_prefix=True):
    folder = root / f"{split}_Folder"
    rows = [("Image", "Description")]
    for i in range(n):
        image, mask = picture(i)
        name = f"covid_{i}.png"
        mask_name = f"mask_{name}" if mask_prefix else name
        write_png(folder / "img" / name, image, rgb=i == 0)
        write_png(folder / "labelcol" / mask_name, mask)
        rows.append((mask_name, f"Bilateral pulmonary infection, {i + 1} infected areas"))
    if table == "csv":
        with open(folder / f"{split}_text.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return folder, rows


def test_read_slice_image_scales_pictures_and_hu(tmp_path):
    image, _ = picture(0)
    write_png(tmp_path / "g.png", image)
    write_png(tmp_path / "c.png", image, rgb=True)
    gray = read_slice_image(tmp_path / "g.png")
    assert gray.dtype == np.float32 and gray.shape == (12, 20)
    np.testing.assert_allclose(gray, image / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_slice_image(tmp_path / "c.png"), gray, atol=1 / 255)
    hu = np.array([[-1000, -160], [40, 1000]], np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(hu[None]), str(tmp_path / "s.nii.gz"))
    np.testing.assert_allclose(read_slice_image(tmp_path / "s.nii.gz", (-160, 240)), [[0, 0], [0.5, 1]])


def test_lvit_csv_items(tmp_path):
    folder, rows = make_lvit(tmp_path)
    data = LViTDataset(tmp_path, "train", image_size=SIZE)
    assert len(data) == 3
    for i in range(3):
        item = data[i]
        assert item["image"].shape == (1, SIZE, SIZE) and item["mask"].shape == (1, SIZE, SIZE)
        assert item["text"] == rows[i + 1][1]
        assert item["present"] == 1.0 and item["kind"] == "lvit" and item["z"] == 0
        image, mask = picture(i)
        # The bright square of the picture is where the mask is.
        inside = item["image"][0][item["mask"][0] > 0]
        assert float(inside.mean()) > 0.8 and float(item["image"][0][item["mask"][0] == 0].mean()) < 0.5
        # Aspect ratio kept: 12 rows of 20 fill the middle of the square, padding rows are zero.
        assert float(item["image"][0, 0].max()) == 0.0
    # root may also be the split folder itself
    assert len(LViTDataset(folder, image_size=SIZE)) == 3


def test_lvit_same_names_without_prefix(tmp_path):
    make_lvit(tmp_path, split="Val", n=2, mask_prefix=False)
    data = LViTDataset(tmp_path, "val", image_size=SIZE)
    assert [data[i]["id"] for i in range(2)] == ["val/covid_0", "val/covid_1"]


def test_lvit_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="img"):
        LViTDataset(tmp_path, "train")
    folder, _ = make_lvit(tmp_path, table="none")
    with pytest.raises(FileNotFoundError, match="Train_text.csv or Train_text.xlsx"):
        LViTDataset(tmp_path, "train")
    (folder / "Train_text.csv").write_text("Image,Description\nmask_missing.png,nothing here\n")
    with pytest.raises(ValueError, match="row 2: no image file for 'mask_missing.png'"):
        LViTDataset(tmp_path, "train")
    (folder / "Train_text.csv").write_text("Name,Text\na,b\n")
    with pytest.raises(ValueError, match="columns Image and Description"):
        LViTDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        LViTDataset(tmp_path, "dev")


def test_lvit_xlsx_without_openpyxl_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # as if it were not installed: import fails
    folder, _ = make_lvit(tmp_path, table="none")
    (folder / "Train_text.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="openpyxl.*CSV"):
        LViTDataset(tmp_path, "train")


@pytest.mark.skipif(importlib.util.find_spec("openpyxl") is None, reason="openpyxl not installed")
def test_lvit_xlsx(tmp_path):
    import openpyxl

    folder, rows = make_lvit(tmp_path, table="none")
    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(list(row))
    book.save(folder / "Train_text.xlsx")
    data = LViTDataset(tmp_path, "train", image_size=SIZE)
    assert [data[i]["text"] for i in range(3)] == [r[1] for r in rows[1:]]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_reflist_formats(tmp_path, fmt):
    entries = []
    for i in range(2):
        image, mask = picture(i)
        write_png(tmp_path / "img" / f"s{i}.png", image)
        write_png(tmp_path / "msk" / f"s{i}.png", mask)
        entries.append({"image": f"img/s{i}.png", "expression": f"lesion {i}", "mask": f"msk/s{i}.png"})
    entries.append({"image": "img/s0.png", "expression": "a cyst in the spleen", "mask": ""})
    path = tmp_path / f"list.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(entries))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "expression", "mask"])
            writer.writeheader()
            writer.writerows(entries)
    data = RefListDataset(path, image_size=SIZE)
    assert len(data) == 3
    first, negative = data[0], data[2]
    assert first["text"] == "lesion 0" and first["present"] == 1.0
    expected = (read_slice_mask(tmp_path / "msk" / "s0.png")).sum() / (20 * 20) * SIZE * SIZE
    assert abs(float(first["mask"].sum()) - expected) <= 0.35 * expected
    assert negative["present"] == 0.0 and float(negative["mask"].sum()) == 0.0
    assert negative["text"] == "a cyst in the spleen"


def test_reflist_with_ct_slices_in_hu(tmp_path):
    hu = np.full((1, 10, 10), -1000, np.int16)
    hu[0, 2:6, 2:6] = 60
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / "slice.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((hu > 0).astype(np.uint8)), str(tmp_path / "mask.nii.gz"))
    (tmp_path / "l.jsonl").write_text(
        json.dumps({"image": "slice.nii.gz", "text": "the lesion", "mask_path": "mask.nii.gz", "id": "x1"})
    )
    item = RefListDataset(tmp_path / "l.jsonl", image_size=10, hu_window=(-160, 240))[0]
    assert item["id"] == "x1" and item["case"] == "slice"
    np.testing.assert_allclose(item["image"][0, 2, 2].item(), (60 + 160) / 400, atol=1e-6)
    assert item["image"][0, 0, 0].item() == 0.0 and item["mask"].sum().item() == 16


def test_reflist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        RefListDataset(tmp_path / "nope.json")
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(ValueError, match="entry 1: needs an image path"):
        RefListDataset(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps([{"image": "x.png", "text": "t"}]))
    with pytest.raises(ValueError, match="x.png not found"):
        RefListDataset(tmp_path / "b.json")
    (tmp_path / "c.jsonl").write_text('{"image": "x.png",\n')
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        RefListDataset(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported list format"):
        RefListDataset(tmp_path / "d.txt")
    image, mask = picture(0)
    write_png(tmp_path / "i.png", image)
    write_png(tmp_path / "m.png", mask[:5])
    (tmp_path / "e.json").write_text(json.dumps([{"image": "i.png", "text": "t", "mask": "m.png"}]))
    with pytest.raises(ValueError, match="m.png: mask size"):
        RefListDataset(tmp_path / "e.json")[0]


def test_ct_slices_and_masks_are_read_in_the_canonical_orientation_of_the_volumes(tmp_path):
    """A RAS slice (x toward the patient's right) is flipped to LPS like every CT volume, so that
    "left" means the patient's left; image and mask files turn together; a sagittal slice is refused."""
    from lsms_core.intensity import normalize_hu
    from lsms_core.io import read_volume, to_canonical

    hu = np.arange(12, dtype=np.int16).reshape(1, 3, 4) * 50 - 160  # asymmetric in x and y
    img = sitk.GetImageFromArray(hu)
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS, as most NIfTI files
    sitk.WriteImage(img, str(tmp_path / "ras.nii.gz"))
    mask = sitk.GetImageFromArray((hu == hu[0, 0, 0]).astype(np.uint8))  # the first voxel only
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(tmp_path / "ras_mask.nii.gz"))

    window = (-160.0, 240.0)
    expected = normalize_hu(to_canonical(read_volume(tmp_path / "ras.nii.gz")).array[0], window)
    got = read_slice_image(tmp_path / "ras.nii.gz", window)
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(got, normalize_hu(hu[0, ::-1, ::-1], window))
    got_mask = read_slice_mask(tmp_path / "ras_mask.nii.gz")
    assert got_mask[-1, -1] and got_mask.sum() == 1  # the voxel moved with its image

    swapped = sitk.GetImageFromArray(hu)  # rows run left-right: transposed onto the canonical grid
    swapped.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(swapped, str(tmp_path / "swapped.nii.gz"))
    expected = normalize_hu(to_canonical(read_volume(tmp_path / "swapped.nii.gz")).array[0], window)
    assert expected.shape == (4, 3)
    np.testing.assert_allclose(read_slice_image(tmp_path / "swapped.nii.gz", window), expected)

    sagittal = sitk.GetImageFromArray(hu)
    sagittal.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    sitk.WriteImage(sagittal, str(tmp_path / "sag.nii.gz"))
    with pytest.raises(ValueError, match="not axial"):
        read_slice_image(tmp_path / "sag.nii.gz")
