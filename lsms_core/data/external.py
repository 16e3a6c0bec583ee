"""Readers for external 2D referring-segmentation datasets.

Two layouts are supported, both yielding the same item dicts as
:class:`lsms_core.data.dataset.SliceDataset` (``image`` float32 ``(1, S, S)`` in [0, 1], ``mask``
float32 ``(1, S, S)``, ``text``, ``present``, ``case``, ``z``, ``kind``, ``id``):

* :class:`LViTDataset`: the layout of LViT (QaTa-COV19, MosMedData+)::

      ROOT/Train_Folder/img/NAME.png           image
      ROOT/Train_Folder/labelcol/NAME.png      mask (any value > 0 is foreground), also "mask_NAME.png"
      ROOT/Train_Folder/Train_text.xlsx        table with columns Image, Description (or Train_text.csv)

  (``Val_Folder``/``Val_text``, ``Test_Folder``/``Test_text`` likewise). The ``Image`` column names
  the mask or the image file; QaTa-COV19 masks carry a ``mask_`` prefix that the image lacks.
  CSV is always supported, ``.xlsx`` only when ``openpyxl`` is installed.
* :class:`RefListDataset`: a RefHL-Seg-style list (``.json`` list of objects, ``.jsonl`` or ``.csv``)
  of (image path, expression, mask path) rows; paths are relative to the list file. An empty mask
  path means the expression refers to nothing (``present = 0``).

Images are PNG/JPEG/BMP/TIFF (grayscale or RGB, scaled to [0, 1] by their integer range) or a
single CT slice in NIfTI/NRRD/MHA (HU, normalised with ``hu_window``). Both go through
:func:`lsms_core.data.dataset.pad_and_resize`, the transform used for CT slices.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lsms_core.data.dataset import pad_and_resize, prepare_mask
from lsms_core.intensity import normalize_hu

#: Suffixes read as CT slices in HU; anything else is read as an ordinary picture.
HU_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm")
#: Accepted column names in RefHL-Seg-style lists, first match wins.
IMAGE_COLUMNS = ("image", "image_path", "img")
TEXT_COLUMNS = ("expression", "text", "sentence", "description")
MASK_COLUMNS = ("mask", "mask_path", "label")


def read_slice_image(path: str | os.PathLike, hu_window: tuple[float, float] = (-160.0, 240.0)) -> np.ndarray:
    """Read one 2D image as float32 ``(Y, X)`` in [0, 1].

    Pictures (PNG, ...) are converted to grayscale and divided by their integer range; CT slices
    (NIfTI, NRRD, MHA, DICOM; 2D or 3D with one slice) are normalised from HU with ``hu_window``.
    """
    array, is_hu = _read_2d(path)
    if is_hu:
        return normalize_hu(array, hu_window)
    if array.dtype.kind in "ui":
        return (array.astype(np.float32) / np.iinfo(array.dtype).max).clip(0.0, 1.0)
    return array.astype(np.float32).clip(0.0, 1.0)


def read_slice_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D mask as bool ``(Y, X)``: any value > 0 (in any channel) is foreground."""
    array, _ = _read_2d(path, gray=False)
    return (array > 0).any(axis=-1) if array.ndim == 3 else array > 0


def _read_2d(path: str | os.PathLike, gray: bool = True) -> tuple[np.ndarray, bool]:
    """Pixels of a 2D image (RGB converted to grayscale when ``gray``) and whether they are HU."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found; check the dataset folder or list file")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ValueError(f"{path}: cannot read the image (corrupt or unsupported format)") from None
    array = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:
        array = array[0]
    elif img.GetDimension() != 2:
        raise ValueError(f"{path}: expected a 2D image (one slice), got size {img.GetSize()}")
    if img.GetNumberOfComponentsPerPixel() > 1 and gray:
        rgb = array[..., :3].astype(np.float32)
        weights = np.array([0.299, 0.587, 0.114], np.float32)[: rgb.shape[-1]]
        array = (rgb @ (weights / weights.sum())).round().astype(array.dtype)
    is_hu = any(path.name.lower().endswith(s) for s in HU_SUFFIXES)
    if is_hu:
        array = _canonical_slice(array, img, path)
    return array, is_hu


def _canonical_slice(array: np.ndarray, img, path: Path) -> np.ndarray:
    """``array`` (``(Y, X)`` or ``(Y, X, C)``) turned to the canonical LPS orientation the CT volumes
    are trained in (:func:`lsms_core.io.to_canonical`: x toward the patient's left, y toward
    posterior), so that "left" and "right" keep their meaning whatever the file's direction."""
    from lsms_core.io import _permute_flip, canonical_axes

    direction = np.eye(3)
    if img.GetDimension() == 2:
        direction[:2, :2] = np.reshape(img.GetDirection(), (2, 2))
    else:
        direction = np.reshape(img.GetDirection(), (3, 3))
    perm, flip = canonical_axes(direction)
    if perm[2] != 2:
        raise ValueError(
            f"{path}: the slice is not axial (direction {tuple(round(float(v), 3) for v in direction.ravel())}); "
            "give axial CT slices"
        )
    return _permute_flip(array[None], perm, flip)[0]


class _Slice2DDataset(Dataset):
    """Items from ``(image path, mask path or None, text, id)`` rows, as SliceDataset items."""

    kind = "external"

    def __init__(self, rows: list[tuple[Path, Path | None, str, str]], image_size: int, hu_window):
        if not rows:
            raise ValueError(f"{type(self).__name__}: no (image, mask, text) rows found")
        self.rows, self.image_size, self.hu_window = rows, image_size, tuple(hu_window)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path, text, item_id = self.rows[index]
        image = read_slice_image(image_path, self.hu_window)
        if mask_path is None:
            mask = np.zeros(image.shape, bool)
        else:
            mask = read_slice_mask(mask_path)
            if mask.shape != image.shape:
                raise ValueError(
                    f"{mask_path}: mask size {mask.shape} differs from its image {image_path} {image.shape}"
                )
        present = bool(mask.any())
        return {
            "image": torch.from_numpy(pad_and_resize(image[None], self.image_size)),
            "mask": torch.from_numpy(prepare_mask(mask, self.image_size)),
            "text": text,
            "present": float(present),
            "case": image_path.stem.removesuffix(".nii"),
            "z": 0,
            "kind": self.kind,
            "id": item_id,
        }


class LViTDataset(_Slice2DDataset):
    """A split of an LViT-layout dataset (QaTa-COV19, MosMedData+).

    Args:
        root: the dataset folder holding ``Train_Folder`` etc., or a ``*_Folder`` itself.
        split: ``"train"``, ``"val"`` or ``"test"`` (ignored when ``root`` is a split folder).
        image_size: output side.
        text_file: the text table, if not ``{Split}_text.csv``/``.xlsx`` in the split folder or root.
    """

    kind = "lvit"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        image_size: int = 256,
        text_file: str | os.PathLike | None = None,
        hu_window: tuple[float, float] = (-160.0, 240.0),
    ):
        root = Path(root)
        name = {"train": "Train", "val": "Val", "test": "Test"}.get(split.lower())
        if name is None:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if root.name.endswith("_Folder"):
            folder, name = root, root.name.removesuffix("_Folder")
        else:
            folder = root / f"{name}_Folder"
        for sub in ("img", "labelcol"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(
                    f"{folder / sub}: not found; an LViT-layout split folder holds img/ and labelcol/"
                )
        table = Path(text_file) if text_file else _find_text_table(folder, root, name)
        rows = []
        for line, (key, text) in enumerate(_read_text_table(table), start=2):
            image, mask = _match_lvit_files(folder, key)
            if image is None or mask is None:
                missing = "image" if image is None else "mask"
                raise ValueError(
                    f"{table}: row {line}: no {missing} file for {key!r} in {folder}/"
                    f"{'img' if image is None else 'labelcol'}; fix the table or the folder"
                )
            rows.append((image, mask, text, f"{name.lower()}/{Path(key).stem}"))
        super().__init__(rows, image_size, hu_window)


def _find_text_table(folder: Path, root: Path, name: str) -> Path:
    for base in (folder, root):
        for suffix in (".csv", ".xlsx"):
            if (base / f"{name}_text{suffix}").is_file():
                return base / f"{name}_text{suffix}"
    raise FileNotFoundError(
        f"{folder}: no {name}_text.csv or {name}_text.xlsx (columns Image, Description) in the split "
        "folder or the dataset root; pass text_file="
    )


def _read_text_table(path: Path) -> list[tuple[str, str]]:
    """(Image, Description) rows of a CSV or XLSX table."""
    if path.suffix.lower() == ".xlsx":
        try:
            import openpyxl
        except ImportError:
            raise ValueError(
                f"{path}: reading .xlsx needs the openpyxl package; `pip install openpyxl` or save the "
                "table as CSV (same name, .csv)"
            ) from None
        sheet = openpyxl.load_workbook(path, read_only=True).active
        header, *body = [
            ["" if v is None else str(v) for v in row] for row in sheet.iter_rows(values_only=True)
        ]
    else:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header, *body = list(csv.reader(fh))
    columns = {h.strip().lower(): i for i, h in enumerate(header)}
    if "image" not in columns or "description" not in columns:
        raise ValueError(f"{path}: the table needs columns Image and Description, found {header}")
    i, j = columns["image"], columns["description"]
    return [(row[i].strip(), row[j].strip()) for row in body if len(row) > max(i, j) and row[i].strip()]


def _match_lvit_files(folder: Path, key: str) -> tuple[Path | None, Path | None]:
    """Image and mask files for a table key (a mask or image name, with or without ``mask_``)."""
    bare = key.removeprefix("mask_")
    image = next((p for p in (folder / "img" / bare, folder / "img" / key) if p.is_file()), None)
    mask_candidates = (
        folder / "labelcol" / key,
        folder / "labelcol" / f"mask_{bare}",
        folder / "labelcol" / bare,
    )
    mask = next((p for p in mask_candidates if p.is_file()), None)
    return image, mask


class RefListDataset(_Slice2DDataset):
    """A RefHL-Seg-style list of (slice image, expression, mask) rows.

    Args:
        list_file: ``.json`` (a list of objects), ``.jsonl`` or ``.csv``. Columns/keys: image
            (``image``/``image_path``/``img``), expression (``expression``/``text``/``sentence``/
            ``description``), mask (``mask``/``mask_path``/``label``; empty = refers to nothing).
            Relative paths are relative to the list file's folder.
        image_size: output side.
        hu_window: HU window for CT slices stored as NIfTI/NRRD/MHA.
    """

    kind = "reflist"

    def __init__(
        self,
        list_file: str | os.PathLike,
        *,
        image_size: int = 256,
        hu_window: tuple[float, float] = (-160.0, 240.0),
    ):
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: list file not found")
        rows = []
        for n, record in enumerate(_read_list(list_file), start=1):
            where = f"{list_file}: entry {n}"
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected an object with image, expression and mask")
            keys = {k.strip().lower(): v for k, v in record.items()}
            image = _first(keys, IMAGE_COLUMNS)
            text = _first(keys, TEXT_COLUMNS)
            if not image or not text:
                raise ValueError(
                    f"{where}: needs an image path ({'/'.join(IMAGE_COLUMNS)}) and an expression "
                    f"({'/'.join(TEXT_COLUMNS)}); got keys {sorted(keys)}"
                )
            mask = _first(keys, MASK_COLUMNS)
            image_path = list_file.parent / image
            mask_path = list_file.parent / mask if mask else None
            for path in (image_path, mask_path):
                if path is not None and not path.is_file():
                    raise ValueError(f"{where}: file {path} not found")
            rows.append(
                (image_path, mask_path, str(text), str(keys.get("id") or f"{list_file.stem}-{n:05d}"))
            )
        super().__init__(rows, image_size, hu_window)


def _read_list(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    try:
        if suffix == ".json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json list file must hold a JSON list of objects")
            return records
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    raise ValueError(f"{path}: unsupported list format {suffix!r}; use .json, .jsonl or .csv")


def _first(record: dict, names: tuple[str, ...]):
    return next((record[n] for n in names if record.get(n) not in (None, "")), None)
