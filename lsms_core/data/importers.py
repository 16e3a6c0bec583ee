"""Import public liver-tumour datasets into the LSMS dataset format (``lsms data import``).

Supported layouts (``kind``):

* ``"lits"``: LiTS (Liver Tumor Segmentation challenge): ``volume-N.nii`` CTs beside
  ``segmentation-N.nii`` label maps (0 background, 1 liver, 2 tumour), in one folder or spread over
  subfolders (e.g. ``Training Batch 1/``, ``Training Batch 2/``).
* ``"msd"``: Medical Segmentation Decathlon Task03_Liver: ``dataset.json``,
  ``imagesTr/liver_N.nii.gz``, ``labelsTr/liver_N.nii.gz`` (1 liver, 2 cancer). ``imagesTs`` (no
  labels) and macOS ``._*`` files are ignored.
* ``"nnunet"``: an nnU-Net raw dataset: ``dataset.json`` whose ``labels`` map names to ids (v2) or
  ids to names (v1), ``imagesTr/CASE_0000.nii.gz`` (only channel 0 is read), ``labelsTr/CASE.nii.gz``.
  The liver and tumour labels are found by name ("liver"; "tumour"/"tumor"/"lesion"/"cancer"/
  "metastasis"/"hcc"); MSD uses the same lookup with liver 1 / cancer 2 as fallback.

Every case becomes: the CT unchanged (original orientation and geometry), a lesion instance map made
by splitting the tumour label into 3D connected components (26-connectivity, components smaller than
``min_lesion_voxels`` dropped, ids 1..N from largest to smallest), the liver mask (liver | tumour),
and referring expressions generated from lesion attributes measured on canonical arrays
(:mod:`lsms_core.data.expressions`). Splits are case-level and deterministic for ``seed``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsms_core._atomic import atomic_folder

logger = logging.getLogger(__name__)

LAYOUTS = ("lits", "msd", "nnunet")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_TUMOUR_NAME = re.compile(r"tumou?r|lesion|cancer|metasta|hcc|carcinoma|neoplasm", re.IGNORECASE)
_LIVER_NAME = re.compile(r"liver|hepat", re.IGNORECASE)
_LITS_FILE = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")
_LICENSES = {
    "lits": "CC-BY-NC-SA-4.0 (LiTS challenge data; check the terms of your copy)",
    "msd": "CC-BY-SA-4.0 (Medical Segmentation Decathlon; check the terms of your copy)",
}


@dataclass(frozen=True)
class SourceCase:
    """One case of a source dataset: where its image and label map are, and which labels mean what."""

    case_id: str
    image: Path
    label: Path
    liver_labels: tuple[int, ...]
    tumour_labels: tuple[int, ...]


def import_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    kind: str = "auto",
    seed: int = 0,
    min_lesion_voxels: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a LiTS, MSD Task03_Liver or nnU-Net raw dataset into an LSMS dataset at ``out``.

    Args:
        src: the source dataset folder.
        out: the new LSMS dataset folder (must not hold a dataset yet).
        kind: "auto" (detect, see :func:`detect_layout`), "lits", "msd" or "nnunet".
        seed: seed of the expression generator and of the train/val/test split.
        min_lesion_voxels: tumour components smaller than this are dropped (label noise).
        progress: called as ``progress(done, total)`` after each case.

    Returns:
        the dataset folder ``out``.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: empty folder, unknown layout, images without label maps, a label map on another
            grid than its image, no tumour label in ``dataset.json``, or ``out`` already a dataset.
    """
    src = Path(src)
    if min_lesion_voxels < 1:
        raise ValueError(f"min_lesion_voxels must be >= 1, got {min_lesion_voxels}")
    layout = detect_layout(src) if kind == "auto" else _check_kind(kind)
    cases = find_cases(src, layout)
    meta = _read_dataset_json(src) if layout != "lits" else {}
    if (Path(out) / "dataset.json").exists():
        raise ValueError(f"{out}: already holds a dataset; choose another folder")
    # Written beside ``out`` and renamed at the end: a case that fails (e.g. a label map on another
    # grid) leaves no half dataset behind, and the same command runs again once the data is fixed.
    with atomic_folder(out) as partial:
        _import_cases(
            partial, src, layout, cases, meta, seed=seed, min_voxels=min_lesion_voxels, progress=progress
        )
    return Path(out)


def _import_cases(
    out: Path, src: Path, layout: str, cases, meta: dict, *, seed: int, min_voxels: int, progress
) -> None:
    """Write the dataset of :func:`import_dataset` into ``out``."""
    from scipy import ndimage

    from lsms_core.data.dataset import DatasetWriter
    from lsms_core.data.expressions import generate_expressions, lesion_attributes
    from lsms_core.io import read_label, read_volume, to_canonical

    writer = DatasetWriter(
        out,
        name=f"{layout}-{src.resolve().name}",
        description=f"Imported from the {layout.upper()} layout at {src} with referring expressions "
        "generated from lesion attributes (lsms_core.data.expressions).",
        license=str(
            meta.get("licence") or meta.get("license") or _LICENSES.get(layout, "see the source dataset")
        ),
        provenance={
            "source_layout": layout,
            "source_path": str(src.resolve()),
            "source_name": meta.get("name"),
            "source_reference": meta.get("reference"),
            "importer": "lsms_core.data.importers.import_dataset",
            "seed": seed,
            "min_lesion_voxels": min_voxels,
            "lesion_instances": "3D connected components (26-connectivity) of the tumour labels",
        },
    )
    structure = ndimage.generate_binary_structure(3, 3)
    for done, case in enumerate(cases, start=1):
        image = read_volume(case.image)
        label = read_label(case.label, like=image).array
        tumour = np.isin(label, case.tumour_labels)
        liver = np.isin(label, case.liver_labels) | tumour
        lesions = split_instances(tumour, min_voxels, structure=structure)

        canonical = to_canonical(image)
        attrs = lesion_attributes(
            canonical.array,
            to_canonical(image.with_array(lesions)).array,
            to_canonical(image.with_array(liver)).array,
            canonical.scale,
        )
        writer.add_case(case.case_id, image=image, lesions=lesions, organ=liver.astype(np.uint8))
        writer.add_expressions(generate_expressions(attrs, case.case_id, seed=seed))
        logger.info("imported %s: %d lesions", case.case_id, len(attrs))
        if progress is not None:
            progress(done, len(cases))
    writer.make_splits(seed=seed)


def split_instances(
    tumour: np.ndarray, min_voxels: int = 10, *, structure: np.ndarray | None = None
) -> np.ndarray:
    """Split a binary tumour mask into lesion instances: connected components of at least
    ``min_voxels`` voxels, numbered 1..N from the largest to the smallest (ties in scan order).

    ``structure`` is the connectivity (default 26-connectivity in 3D).
    """
    from scipy import ndimage

    tumour = np.asarray(tumour, dtype=bool)
    if structure is None:
        structure = ndimage.generate_binary_structure(tumour.ndim, tumour.ndim)
    components, n = ndimage.label(tumour, structure=structure)
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels]
    dtype = np.uint16 if len(keep) < 2**16 else np.uint32
    lookup = np.zeros(n + 1, dtype=dtype)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=dtype)
    return lookup[components]


# --------------------------------------------------------------------------------------------------
# Layout detection and case discovery
# --------------------------------------------------------------------------------------------------


def detect_layout(src: str | os.PathLike) -> str:
    """Which layout a folder holds: "msd" or "nnunet" (``dataset.json`` + ``imagesTr/``; nnU-Net image
    names end in a ``_0000`` channel suffix), or "lits" (``volume-N.nii`` files anywhere below)."""
    src = Path(src)
    _check_folder(src)
    images_tr = src / "imagesTr"
    if (src / "dataset.json").is_file() and images_tr.is_dir():
        stems = [_stem(p) for p in _image_files(images_tr)]
        if stems and all(_CHANNEL.match(s) for s in stems):
            return "nnunet"
        return "msd"
    if any(_LITS_FILE.match(p.name) for p in src.rglob("*.nii*")):
        return "lits"
    found = sorted(p.name for p in src.iterdir())[:8]
    raise ValueError(
        f"{src}: unknown dataset layout (found {', '.join(found)}). Expected LiTS (volume-N.nii with "
        "segmentation-N.nii), MSD Task03_Liver or an nnU-Net raw dataset (dataset.json, imagesTr/, "
        "labelsTr/); pass the folder that holds them, or kind='lits'/'msd'/'nnunet'"
    )


def find_cases(src: str | os.PathLike, layout: str) -> list[SourceCase]:
    """The labelled cases of a source dataset, sorted by case id."""
    src = Path(src)
    _check_folder(src)
    layout = _check_kind(layout)
    if layout == "lits":
        return _lits_cases(src)
    return _decathlon_cases(src, nnunet=layout == "nnunet")


def _lits_cases(src: Path) -> list[SourceCase]:
    files: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for path in sorted(src.rglob("*.nii*")):
        match = _LITS_FILE.match(path.name)
        if not match:
            continue
        role, number = match.group(1).lower(), int(match.group(2))
        if number in files[role]:
            raise ValueError(
                f"{src}: {role}-{number} appears twice ({files[role][number]} and {path}); keep one copy"
            )
        files[role][number] = path
    if not files["volume"]:
        raise ValueError(f"{src}: no LiTS volume-N.nii files found; pass the folder holding the LiTS data")
    _check_labelled(
        src, [str(files["volume"][n]) for n in sorted(set(files["volume"]) - set(files["segmentation"]))]
    )
    return [
        SourceCase(f"lits_{n:03d}", files["volume"][n], files["segmentation"][n], (1,), (2,))
        for n in sorted(files["volume"])
    ]


def _decathlon_cases(src: Path, *, nnunet: bool) -> list[SourceCase]:
    images_tr, labels_tr = src / "imagesTr", src / "labelsTr"
    if not images_tr.is_dir():
        raise ValueError(
            f"{src}: no imagesTr/ folder; an MSD or nnU-Net dataset keeps its training CTs there"
        )
    meta = _read_dataset_json(src)
    liver_labels, tumour_labels = label_ids(meta.get("labels"), src / "dataset.json", default=not nnunet)
    images = _image_files(images_tr)
    if not images:
        raise ValueError(
            f"{images_tr}: no images (.nii.gz, .nii, .nrrd, .mha) found; is the dataset unpacked?"
        )
    cases, missing = {}, []
    for image in images:
        stem, suffix = _stem(image), image.name[len(_stem(image)) :]
        case_name = stem
        if nnunet:
            match = _CHANNEL.match(stem)
            if match is None:
                raise ValueError(
                    f"{image}: nnU-Net image names end in a 4-digit channel suffix (CASE_0000{suffix}); "
                    "rename the file or import with kind='msd'"
                )
            if match.group(2) != "0000":
                continue  # further channels: only channel 0 (the CT) is imported
            case_name = match.group(1)
        label = labels_tr / f"{case_name}{suffix}"
        if not label.is_file():
            missing.append(str(image))
            continue
        case_id = re.sub(r"[^A-Za-z0-9._-]", "_", case_name).lstrip(".") or "case"
        if case_id in cases:
            raise ValueError(f"{images_tr}: two images map to case id {case_id!r}; rename one of them")
        cases[case_id] = SourceCase(case_id, image, label, liver_labels, tumour_labels)
    _check_labelled(src, missing, hint="labelsTr/ must hold a label map with the same name for each image")
    return [cases[k] for k in sorted(cases)]


def label_ids(
    labels: dict | None, where: str | os.PathLike, *, default: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (liver ids, tumour ids) of a ``dataset.json`` ``labels`` entry, found by name.

    Accepts v1 (``{"0": "background", "1": "liver", "2": "cancer"}``) and v2 (``{"background": 0,
    "liver": 1, "tumor": 2}``, region lists ``[1, 2]`` allowed). A name matching a tumour word wins over
    "liver" ("liver tumour" is a tumour label). With ``default`` and no ``labels``, MSD's 1 / 2.
    """
    if not labels:
        if default:
            return (1,), (2,)
        raise ValueError(f"{where}: no 'labels' entry; an nnU-Net dataset.json must map label names to ids")
    pairs: list[tuple[str, tuple[int, ...]]] = []
    for key, value in labels.items():
        if isinstance(value, str) and str(key).lstrip("-").isdigit():  # v1: id -> name
            pairs.append((value, (int(key),)))
        elif isinstance(value, int | list | tuple):  # v2: name -> id (or region ids)
            ids = tuple(int(v) for v in (value if isinstance(value, list | tuple) else [value]))
            pairs.append((str(key), ids))
        else:
            raise ValueError(f"{where}: cannot read label {key!r}: {value!r}; use name -> id or id -> name")
    tumour = tuple(sorted({i for name, ids in pairs if _TUMOUR_NAME.search(name) for i in ids}))
    liver = tuple(
        sorted(
            {
                i
                for name, ids in pairs
                if _LIVER_NAME.search(name) and not _TUMOUR_NAME.search(name)
                for i in ids
            }
        )
    )
    if not tumour:
        names = ", ".join(name for name, _ in pairs)
        raise ValueError(
            f"{where}: no tumour label among the labels ({names}); LSMS needs a label named like "
            "'tumour', 'tumor', 'lesion' or 'cancer'. Rename it in dataset.json"
        )
    return tuple(i for i in liver if i not in tumour), tumour


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> str:
    if kind not in LAYOUTS:
        raise ValueError(f"kind must be 'auto' or one of {LAYOUTS}, got {kind!r}")
    return kind


def _check_folder(src: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such folder; pass the folder of the source dataset")
    if not src.is_dir():
        raise ValueError(f"{src}: not a folder; pass the folder of the source dataset (LiTS, MSD or nnU-Net)")
    if not any(src.iterdir()):
        raise ValueError(f"{src}: the folder is empty; download and unpack the source dataset into it first")


def _check_labelled(src: Path, unlabelled: Iterable[str], hint: str = "") -> None:
    unlabelled = list(unlabelled)
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (
            f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else ""
        )
        raise ValueError(
            f"{src}: {len(unlabelled)} image(s) have no label map: {shown}. "
            f"{hint or 'Each volume-N.nii needs its segmentation-N.nii'}; add them or remove the images"
        )


def _read_dataset_json(src: Path) -> dict:
    path = src / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return meta


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder (hidden and macOS ``._`` files skipped), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(_IMAGE_SUFFIXES)
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


__all__ = [
    "LAYOUTS",
    "SourceCase",
    "detect_layout",
    "find_cases",
    "import_dataset",
    "label_ids",
    "split_instances",
]
