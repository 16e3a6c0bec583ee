"""The LSMS dataset format: writing, reading and 2D training slices.

A dataset is a folder (see ``docs/data.md``)::

    DATASET/dataset.json              format, name, license, provenance, label meaning
    DATASET/cases/CASE/image.nii.gz   CT in HU, any orientation
    DATASET/cases/CASE/lesions.nii.gz lesion instance label map (0 background, 1..N)
    DATASET/cases/CASE/organ.nii.gz   optional organ (liver) mask
    DATASET/expressions.jsonl         one referring-expression record per line
    DATASET/splits.json               case-level train / val / test splits

:class:`DatasetWriter` writes it (every file atomically), :class:`ReferringDataset` opens and validates
it, and :class:`SliceDataset` turns it into a ``torch.utils.data.Dataset`` of (expression, slice) items
for 2D training. :func:`prepare_slices` and :func:`resize_mask_back` are the image transform shared
with volume inference.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lsms_core._atomic import atomic_write_json, atomic_write_text
from lsms_core.data.expressions import SLICE_DECIDERS, decided_on_slice
from lsms_core.intensity import normalize_hu
from lsms_core.io import Volume, read_label, read_volume, to_canonical, write_volume

FORMAT = "lsms-dataset"
FORMAT_VERSION = 1
SOURCES = ("generated", "human", "correction")
SPLITS = ("train", "val", "test")
IMAGE_FILE, LESIONS_FILE, ORGAN_FILE, CASE_INFO_FILE = (
    "image.nii.gz",
    "lesions.nii.gz",
    "organ.nii.gz",
    "case.json",
)
_CASE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass
class Case:
    """One loaded case: the CT and its label maps on the same grid."""

    case_id: str
    image: Volume
    lesions: np.ndarray
    organ: np.ndarray | None = None
    canonical: bool = True

    @property
    def lesion_ids(self) -> list[int]:
        return [int(i) for i in np.unique(self.lesions) if i > 0]


# --------------------------------------------------------------------------------------------------
# Validation shared by writer and reader
# --------------------------------------------------------------------------------------------------


def _check_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise ValueError(
            f"case id {case_id!r} is not valid: use letters, digits, '.', '_' or '-' (not starting with '.')"
        )
    return case_id


def _check_record(record: Any, where: str, cases: Iterable[str], root: Path) -> dict:
    """Validate the structure of one expression record; ``where`` locates it in error messages."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: an expression record must be a JSON object, got {type(record).__name__}")
    for key in ("id", "case", "expression"):
        if key not in record:
            raise ValueError(
                f"{where}: the record has no {key!r} field; every record needs id, case, expression"
            )
    if not isinstance(record["expression"], str) or not record["expression"].strip():
        raise ValueError(f"{where}: 'expression' must be a non-empty string")
    if record["case"] not in cases:
        raise ValueError(f"{where}: unknown case {record['case']!r}; add the case before its expressions")
    if "mask" in record:
        mask = record["mask"]
        if not isinstance(mask, str) or Path(mask).is_absolute() or ".." in Path(mask).parts:
            raise ValueError(f"{where}: 'mask' must be a path relative to the dataset root, got {mask!r}")
        if not (root / mask).is_file():
            raise ValueError(f"{where}: the mask file {root / mask} does not exist")
    elif "targets" not in record:
        raise ValueError(f"{where}: the record needs 'targets' (lesion ids, [] for none) or a 'mask' file")
    targets = record.get("targets", [])
    if not isinstance(targets, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in targets
    ):
        raise ValueError(f"{where}: 'targets' must be a list of integer lesion ids, got {targets!r}")
    if record.get("source", "generated") not in SOURCES:
        raise ValueError(f"{where}: 'source' must be one of {SOURCES}, got {record.get('source')!r}")
    if record.get("slices") is not None:
        try:
            slice_ranges(record["slices"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return record


def slice_ranges(slices: Any) -> list[tuple[int, int]]:
    """A record's ``slices`` field as a list of inclusive ``(z0, z1)`` ranges.

    The field is one range ``[z0, z1]`` or, for a correction reviewed in several pieces, a list of
    them ``[[z0, z1], [z2, z3]]``; ``ValueError`` for anything else.
    """

    def one(value: Any) -> tuple[int, int] | None:
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and value[0] <= value[1]
        )
        return (value[0], value[1]) if ok else None

    single = one(slices)
    if single is not None:
        return [single]
    ranges = [one(v) for v in slices] if isinstance(slices, list) and slices else [None]
    if any(r is None for r in ranges):
        raise ValueError(
            f"'slices' must be [z0, z1] or a list of [z0, z1] ranges, with integers z0 <= z1, got {slices!r}"
        )
    return ranges


def union_slice_ranges(*fields: Any) -> list | None:
    """The ``slices`` field covering every given one (None, "all slices", wins).

    Overlapping and touching ranges merge; one resulting range is written ``[z0, z1]``, several
    ``[[z0, z1], ...]``.
    """
    if not fields or any(f is None for f in fields):
        return None
    merged: list[list[int]] = []
    for z0, z1 in sorted(r for f in fields for r in slice_ranges(f)):
        if merged and z0 <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], z1)
        else:
            merged.append([z0, z1])
    return merged[0] if len(merged) == 1 else merged


def _check_splits(splits: Any, where: str, cases: Iterable[str]) -> dict[str, list[str]]:
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise ValueError(f"{where}: splits must map split names to lists of case ids")
    cases = set(cases)
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        for case_id in ids:
            if case_id not in cases:
                raise ValueError(f"{where}: split {name!r} names unknown case {case_id!r}")
            if case_id in seen:
                raise ValueError(f"{where}: case {case_id!r} is in both {seen[case_id]!r} and {name!r}")
            seen[case_id] = name
    return {name: list(ids) for name, ids in splits.items()}


def _lesion_summary(lesions_canonical: np.ndarray, organ_canonical: np.ndarray | None) -> dict:
    """Per-lesion voxel counts and canonical slices, and the organ's canonical slices."""
    info: dict[str, Any] = {"shape": list(lesions_canonical.shape), "lesions": {}}
    zs, _, _ = np.nonzero(lesions_canonical)
    ids = lesions_canonical[lesions_canonical > 0]
    for lesion_id in np.unique(ids):
        z = np.unique(zs[ids == lesion_id])
        info["lesions"][str(int(lesion_id))] = {"voxels": int((ids == lesion_id).sum()), "slices": z.tolist()}
    if organ_canonical is not None:
        info["organ_slices"] = np.flatnonzero(
            organ_canonical.reshape(organ_canonical.shape[0], -1).any(1)
        ).tolist()
    return info


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


def _swap_case_folder(folder: Path, staged: Path) -> None:
    """Put the complete case ``staged`` in place of ``folder``, then move ``folder``'s other entries
    (e.g. correction masks) over. Only the two renames are not atomic together; after a crash
    between them or later, the old folder is still whole in ``cases/.ID.*.old/``."""
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    os.replace(folder, old / folder.name)
    os.replace(staged, folder)
    own = {IMAGE_FILE, LESIONS_FILE, ORGAN_FILE, CASE_INFO_FILE}
    for entry in (old / folder.name).iterdir():
        if entry.name not in own and not (folder / entry.name).exists():
            os.replace(entry, folder / entry.name)
    shutil.rmtree(old, ignore_errors=True)


class DatasetWriter:
    """Write an LSMS dataset folder case by case; every file is written atomically.

    Args:
        root: the dataset folder (created).
        name, description, license: stored in ``dataset.json``.
        provenance: free JSON (where the data comes from, attribution, generator settings).
        exist_ok: open an existing dataset to add cases and expressions instead of failing.
        organ_labels: meaning of the organ mask values (default ``{"liver": 1}``).
        extra: further ``dataset.json`` fields.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        name: str,
        description: str = "",
        license: str = "",
        provenance: Any = None,
        exist_ok: bool = False,
        organ_labels: dict[str, int] | None = None,
        extra: dict | None = None,
    ):
        self.root = Path(root)
        self._lesion_ids: dict[str, set[int] | None] = {}  # None: not loaded yet
        self._records: list[dict] = []
        if (self.root / "dataset.json").exists():
            if not exist_ok:
                raise ValueError(
                    f"{self.root}: already holds a dataset; choose another folder or pass exist_ok=True to add to it"
                )
            existing = ReferringDataset(self.root)
            self._lesion_ids = dict.fromkeys(existing.cases)
            self._records = existing.expressions()
            self.meta = existing.meta
            return
        self.meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "description": description,
            "license": license,
            "provenance": provenance,
            "lesion_label_meaning": "instance ids 1..N",
            "organ_labels": dict(organ_labels or {"liver": 1}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        (self.root / "cases").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "dataset.json", self.meta)

    @property
    def cases(self) -> list[str]:
        return sorted(self._lesion_ids)

    def add_case(
        self, case_id: str, image: Volume, lesions: np.ndarray, organ: np.ndarray | None = None
    ) -> Path:
        """Write ``image`` (HU), its lesion instance map and optional organ mask (arrays on ``image``'s grid).

        The image is written first and the lesion map after it: readers list a case only once both
        exist, so an interrupted ``add_case`` leaves no half case behind (call it again to redo it).
        Re-adding an existing case writes the new files into a folder beside it and swaps the two
        folders (other files of the case, e.g. correction masks, move over): an interrupted rewrite
        leaves the old case whole, never the new image with the old lesions or the old summary.
        """
        _check_case_id(case_id)
        lesions = np.asarray(lesions)
        for what, array in (("lesions", lesions), ("organ", organ)):
            if array is None:
                continue
            if np.shape(array) != image.array.shape:
                raise ValueError(
                    f"case {case_id!r}: {what} shape {np.shape(array)} differs from the image shape "
                    f"{image.array.shape}; label maps must lie on the image grid"
                )
        if lesions.dtype.kind not in "biu" or (lesions.size and lesions.min() < 0):
            raise ValueError(
                f"case {case_id!r}: lesions must be a non-negative integer instance map (0 background)"
            )
        if image.array.dtype.kind == "f" and not np.isfinite(image.array).all():
            raise ValueError(
                f"case {case_id!r}: the image contains NaN or infinite values; replace them first"
            )
        folder = self.root / "cases" / case_id
        lesions = lesions.astype(np.uint16 if lesions.max(initial=0) < 2**16 else np.uint32)
        organ = None if organ is None else np.asarray(organ).astype(np.uint8)
        rewrite = (folder / LESIONS_FILE).exists()  # a complete case: stage, then swap
        target = (
            Path(tempfile.mkdtemp(prefix=f".{case_id}.", suffix=".partial", dir=folder.parent))
            if rewrite
            else folder
        )
        try:
            write_volume(target / IMAGE_FILE, image.array, like=image)
            write_volume(target / LESIONS_FILE, lesions, like=image)
            if organ is not None:
                write_volume(target / ORGAN_FILE, organ, like=image)
            elif (target / ORGAN_FILE).exists():  # an interrupted earlier attempt
                (target / ORGAN_FILE).unlink()
            canonical = to_canonical(image.with_array(lesions)).array
            organ_canonical = None if organ is None else to_canonical(image.with_array(organ)).array
            atomic_write_json(target / CASE_INFO_FILE, _lesion_summary(canonical, organ_canonical))
            if rewrite:
                _swap_case_folder(folder, target)
        finally:
            if rewrite:
                shutil.rmtree(target, ignore_errors=True)
        self._lesion_ids[case_id] = {int(i) for i in np.unique(lesions) if i > 0}
        return folder

    def add_expressions(self, records: Iterable[dict]) -> list[dict]:
        """Validate ``records`` and append them to ``expressions.jsonl`` (rewritten atomically).

        A record without ``id`` gets ``CASE-NNNN``. Returns the stored records.
        """
        ids = {r["id"] for r in self._records}
        added = []
        for n, record in enumerate(records):
            record = dict(record)
            record.setdefault("source", "generated")
            if "id" not in record and "case" in record:
                record["id"] = self._next_id(record["case"], ids)
            where = f"expression record {n} ({record.get('id', 'no id')})"
            _check_record(record, where, self._lesion_ids, self.root)
            if record["id"] in ids:
                raise ValueError(f"{where}: duplicate id {record['id']!r}; ids must be unique in the dataset")
            missing = set(record.get("targets", [])) - self._case_lesion_ids(record["case"])
            if missing:
                raise ValueError(
                    f"{where}: targets {sorted(missing)} are not lesion ids of case {record['case']!r} "
                    f"(it has {sorted(self._case_lesion_ids(record['case']))})"
                )
            ids.add(record["id"])
            added.append(record)
        self._records.extend(added)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._records)
        atomic_write_text(self.root / "expressions.jsonl", text)
        return added

    def write_splits(self, splits: dict[str, list[str]]) -> dict[str, list[str]]:
        """Write ``splits.json`` after checking that every case exists and is in one split only."""
        splits = _check_splits(splits, "splits", self._lesion_ids)
        atomic_write_json(self.root / "splits.json", splits)
        return splits

    def make_splits(self, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0) -> dict:
        """Split the cases into train/val/test by ``fractions``, deterministically for ``seed``.

        With 3 or more cases every split with a positive fraction gets at least one case.
        """
        if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
        cases = self.cases
        order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
        counts = [int(round(f * len(cases))) for f in fractions]
        if len(cases) >= 3:
            for i in range(3):  # every split with a positive fraction non-empty
                if fractions[i] > 0 and counts[i] == 0:
                    counts[i] = 1
        while sum(counts) > len(cases):  # take back from the largest split
            counts[int(np.argmax(counts))] -= 1
        counts[0] += len(cases) - sum(counts)
        bounds = np.cumsum([0, *counts])
        splits = {name: sorted(order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(SPLITS)}
        return self.write_splits(splits)

    def _case_lesion_ids(self, case_id: str) -> set[int]:
        if self._lesion_ids.get(case_id) is None:
            info = self.root / "cases" / case_id / CASE_INFO_FILE
            if info.exists():
                self._lesion_ids[case_id] = {int(k) for k in json.loads(info.read_text())["lesions"]}
            else:
                lesions = read_volume(self.root / "cases" / case_id / LESIONS_FILE).array
                self._lesion_ids[case_id] = {int(i) for i in np.unique(lesions) if i > 0}
        return self._lesion_ids[case_id]

    @staticmethod
    def _next_id(case_id: str, ids: set[str]) -> str:
        n = 1
        while f"{case_id}-{n:04d}" in ids:
            n += 1
        return f"{case_id}-{n:04d}"


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


class ReferringDataset:
    """Open and validate an LSMS dataset folder.

    Args:
        root: the dataset folder.
        cache_size: how many loaded cases to keep in memory (LRU); settable later through the
            :attr:`cache_size` property (the Trainer keeps every training case in memory).

    Raises:
        ValueError / FileNotFoundError: missing or wrong ``dataset.json``, a malformed
        ``expressions.jsonl`` line (with its line number), a record naming an unknown case, a bad
        ``splits.json``.
    """

    def __init__(self, root: str | os.PathLike, *, cache_size: int = 4):
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path}: not found; {self.root} is not an LSMS dataset (write one with DatasetWriter "
                "or `lsms data import`)"
            )
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc}); fix or rewrite the file") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: 'format' must be {FORMAT!r}; this is not an LSMS dataset")
        if int(self.meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {self.meta['format_version']} is newer than this lsms_core "
                f"supports ({FORMAT_VERSION}); upgrade napari-lsms"
            )
        cases_dir = self.root / "cases"
        self.cases: list[str] = (
            sorted(
                p.name
                for p in cases_dir.iterdir()
                if (p / IMAGE_FILE).is_file() and (p / LESIONS_FILE).is_file()
            )
            if cases_dir.is_dir()
            else []
        )
        self._records = self._read_expressions()
        self._splits = self._read_splits()
        self._cache: OrderedDict[tuple[str, bool], Case] = OrderedDict()
        self._cache_size = 0
        self.cache_size = cache_size
        self._info: dict[str, dict] = {}
        self._attributes: dict[str, dict] = {}
        self._kinds: dict[str, dict[int, str]] | None = None

    def __repr__(self) -> str:
        return (
            f"ReferringDataset({str(self.root)!r}, cases={len(self.cases)}, expressions={len(self._records)})"
        )

    @property
    def name(self) -> str:
        return self.meta.get("name", self.root.name)

    @property
    def splits(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._splits.items()}

    def split(self, name: str) -> list[str]:
        """Case ids of split ``name`` (``"all"``: every case)."""
        if name == "all":
            return list(self.cases)
        if name not in self._splits:
            raise ValueError(
                f"{self.root / 'splits.json'}: no split {name!r} (have {sorted(self._splits) or 'none'}); "
                "write splits with DatasetWriter.make_splits or pass split='all'"
            )
        return list(self._splits[name])

    def expressions(self, split: str | None = None) -> list[dict]:
        """Expression records (copies), all of them or those of the cases in ``split``."""
        if split is None:
            return [dict(r) for r in self._records]
        cases = set(self.split(split))
        return [dict(r) for r in self._records if r["case"] in cases]

    @property
    def cache_size(self) -> int:
        """How many loaded cases stay in memory (least recently used ones are dropped first)."""
        return self._cache_size

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"cache_size must be a non-negative integer (cases), got {value!r}")
        self._cache_size = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def load_case(self, case_id: str, canonical: bool = True) -> Case:
        """Load a case (image, lesions, organ), in canonical LPS orientation by default. Cached (LRU)."""
        if case_id not in self.cases:
            raise ValueError(
                f"{self.root}: unknown case {case_id!r}; known cases: {', '.join(self.cases[:10])}..."
            )
        key = (case_id, canonical)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        folder = self.root / "cases" / case_id
        image = read_volume(folder / IMAGE_FILE)
        lesions = read_label(folder / LESIONS_FILE, like=image).array
        organ = read_label(folder / ORGAN_FILE, like=image).array if (folder / ORGAN_FILE).is_file() else None
        if canonical:
            lesions = to_canonical(image.with_array(lesions)).array
            organ = None if organ is None else to_canonical(image.with_array(organ)).array
            image = to_canonical(image)
        case = Case(case_id, image, lesions, organ, canonical)
        self._cache[key] = case
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return case

    def case_info(self, case_id: str) -> dict:
        """Summary of a case in canonical orientation: ``shape``, ``lesions`` {id: {voxels, slices}},
        ``organ_slices`` (when it has an organ mask). Read from ``case.json`` or computed."""
        if case_id not in self._info:
            path = self.root / "cases" / case_id / CASE_INFO_FILE
            if path.is_file():
                self._info[case_id] = json.loads(path.read_text(encoding="utf-8"))
            else:
                case = self.load_case(case_id)
                self._info[case_id] = _lesion_summary(case.lesions, case.organ)
        return self._info[case_id]

    def lesion_kinds(self, case_id: str) -> dict[int, str]:
        """Lesion id -> lesion type ("cyst", "metastasis", ...) of a case, as the generator recorded
        it in ``dataset.json``'s ``provenance.case_details``; for a merged dataset, in the source's
        entry of ``provenance.merged_from`` (case ids carry the source's ``case_prefix``). Empty
        when nothing recorded the types (imported or drawn data)."""
        if self._kinds is None:
            self._kinds = {}

            def collect(meta: dict, prefix: str) -> None:
                provenance = meta.get("provenance") or {}
                for case, details in (provenance.get("case_details") or {}).items():
                    kinds = {
                        int(les["id"]): str(les["kind"])
                        for les in (details or {}).get("lesions", [])
                        if "kind" in les
                    }
                    if kinds:
                        self._kinds[prefix + case] = kinds
                for source in provenance.get("merged_from") or []:
                    collect(source.get("dataset") or {}, prefix + str(source.get("case_prefix") or ""))

            collect(self.meta, "")
        return self._kinds.get(case_id, {})

    def lesion_attributes(self, case_id: str) -> dict:
        """Lesion id -> :class:`~lsms_core.data.expressions.LesionAttributes` of a case, measured
        as the expression generator measures them (canonical arrays; lesion types from
        :meth:`lesion_kinds` when the generator recorded them). Cached."""
        if case_id not in self._attributes:
            from lsms_core.data.expressions import lesion_attributes

            case = self.load_case(case_id)
            kinds = self.lesion_kinds(case_id)
            attrs = lesion_attributes(
                case.image.array, case.lesions, case.organ, case.image.scale, appearance=kinds or None
            )
            self._attributes[case_id] = {a.id: a for a in attrs}
        return self._attributes[case_id]

    def decided_on_slice(self, record: dict, z: int) -> str:
        """What picks ``record``'s referent among the lesions canonical slice ``z`` of its case shows
        (one of :data:`~lsms_core.data.expressions.SLICE_DECIDERS`;
        :func:`~lsms_core.data.expressions.decided_on_slice`). The case's lesions and attributes
        are read only when the slice shows a lesion besides the targets."""
        query = record.get("query")
        if not query or "targets" not in record:
            return SLICE_DECIDERS[3]
        if not other_lesion_on_slice(z, record["targets"], self.case_info(record["case"])["lesions"]):
            return SLICE_DECIDERS[0]  # any lesion shown is a target: nothing to choose
        lesions = self.load_case(record["case"]).lesions[z]
        ids, counts = np.unique(lesions[lesions > 0], return_counts=True)
        areas = {int(i): int(n) for i, n in zip(ids, counts)}
        return decided_on_slice(query, record["targets"], areas, self.lesion_attributes(record["case"]))

    def target_mask(self, record: dict, case: Case) -> np.ndarray:
        """The uint8 target mask of ``record`` on ``case``'s grid (its lesions, or its ``mask`` file)."""
        if "mask" in record:  # read_label reorients the mask onto a canonical case's grid
            return (read_label(self.root / record["mask"], like=case.image).array > 0).astype(np.uint8)
        return np.isin(case.lesions, record.get("targets", [])).astype(np.uint8)

    def check(self) -> None:
        """Deep validation: load every case's lesion ids and check every record's targets exist."""
        for i, record in enumerate(self._records, start=1):
            ids = {int(k) for k in self.case_info(record["case"])["lesions"]}
            missing = set(record.get("targets", [])) - ids
            if missing:
                raise ValueError(
                    f"{self.root / 'expressions.jsonl'}:{i}: targets {sorted(missing)} are not lesion ids of "
                    f"case {record['case']!r}"
                )

    def fingerprint(self) -> str:
        """A sha256 hex digest identifying the dataset's content, for checkpoint sidecars.

        Hashes dataset.json (all but its ``created`` time, so regenerating the same data gives the
        same fingerprint), expressions.jsonl and splits.json in full, and each case file's relative
        path, size and the sha256 of its first MiB.
        """
        h = hashlib.sha256()
        for name in ("dataset.json", "expressions.jsonl", "splits.json"):
            path = self.root / name
            h.update(name.encode())
            content = path.read_bytes() if path.is_file() else b"<missing>"
            if name == "dataset.json" and path.is_file():
                meta = {k: v for k, v in json.loads(content).items() if k != "created"}
                content = json.dumps(meta, sort_keys=True).encode()
            h.update(content)
        for case_id in self.cases:
            for path in sorted((self.root / "cases" / case_id).iterdir()):
                if path.is_file():
                    with open(path, "rb") as fh:
                        head = fh.read(1 << 20)
                    h.update(f"{case_id}/{path.name}:{path.stat().st_size}:".encode())
                    h.update(hashlib.sha256(head).digest())
        return h.hexdigest()

    def _read_expressions(self) -> list[dict]:
        path = self.root / "expressions.jsonl"
        if not path.is_file():
            return []
        records, ids = [], set()
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}: malformed JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            _check_record(record, where, self.cases, self.root)
            if record["id"] in ids:
                raise ValueError(f"{where}: duplicate expression id {record['id']!r}")
            ids.add(record["id"])
            records.append(record)
        return records

    def _read_splits(self) -> dict[str, list[str]]:
        path = self.root / "splits.json"
        if not path.is_file():
            return {}
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: not valid JSON ({exc.msg}); fix it or rewrite it with make_splits"
            ) from None
        return _check_splits(splits, str(path), self.cases)


# --------------------------------------------------------------------------------------------------
# Slice transform shared with inference
# --------------------------------------------------------------------------------------------------


def other_lesion_on_slice(z: int, targets: Iterable[int], lesion_slices: dict) -> bool:
    """True when a lesion not in ``targets`` is on canonical slice ``z`` (``lesion_slices``: a
    case's ``case_info(case)["lesions"]``, lesion id -> ``{"slices": [...]}``)."""
    targets = {int(t) for t in targets}
    return any(int(lesion) not in targets and z in info["slices"] for lesion, info in lesion_slices.items())


def adjacent_slices(z: int, k: int, depth: int) -> list[int]:
    """Indices of the ``k`` slices centred on ``z`` (``z-k//2 .. z+k//2``), clamped to ``[0, depth)``."""
    if k < 1:
        raise ValueError(f"in_slices must be >= 1, got {k}")
    return [min(max(z + d, 0), depth - 1) for d in range(-(k // 2), k - k // 2)]


def _square_pad(y: int, x: int) -> tuple[int, int, int]:
    """Side of the padded square and the (top, left) padding for a (y, x) slice."""
    side = max(y, x)
    return side, (side - y) // 2, (side - x) // 2


def pad_and_resize(images: np.ndarray, image_size: int) -> np.ndarray:
    """Zero-pad ``(k, Y, X)`` images to a centred square (keeps the aspect ratio), then resize them to
    ``(k, image_size, image_size)`` (bilinear, antialiased when shrinking). Returns float32."""
    import torch
    import torch.nn.functional as F

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise ValueError(f"images must be (k, Y, X), got shape {images.shape}")
    k, y, x = images.shape
    side, top, left = _square_pad(y, x)
    square = np.zeros((k, side, side), dtype=np.float32)
    square[:, top : top + y, left : left + x] = images
    if side == image_size:
        return square
    out = F.interpolate(
        torch.from_numpy(square)[None],
        size=(image_size, image_size),
        mode="bilinear",
        align_corners=False,
        antialias=side > image_size,
    )
    return out[0].numpy()


def prepare_slices(hu_stack: np.ndarray, image_size: int, hu_window: tuple[float, float]) -> np.ndarray:
    """The model's input for a stack of canonical CT slices (shared by training and inference).

    ``normalize_hu`` to [0, 1], then :func:`pad_and_resize` to ``image_size``.

    Args:
        hu_stack: ``(k, Y, X)`` HU slices.
    Returns:
        float32 ``(k, image_size, image_size)``.
    """
    hu_stack = np.asarray(hu_stack)
    if hu_stack.ndim != 3:
        raise ValueError(f"hu_stack must be (k, Y, X), got shape {hu_stack.shape}")
    return pad_and_resize(normalize_hu(hu_stack, hu_window), image_size)


def prepare_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """A ``(Y, X)`` mask on the model grid: float32 ``(1, S, S)`` in {0, 1}, same geometry as the image."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (Y, X), got shape {mask.shape}")
    resized = pad_and_resize((mask > 0)[None], image_size)
    return (resized >= 0.5).astype(np.float32)


def resize_mask_back(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Invert :func:`prepare_slices`' geometry: ``(..., S, S)`` model-size maps to ``(..., Y, X)``.

    Bilinear resize of (probability) maps to the padded square, then crop the padding. Threshold the
    result afterwards. Returns float32.
    """
    import torch
    import torch.nn.functional as F

    mask = np.asarray(mask, dtype=np.float32)
    y, x = shape
    side, top, left = _square_pad(y, x)
    lead = mask.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(mask.reshape(-1, 1, *mask.shape[-2:])))
    if mask.shape[-2:] != (side, side):
        t = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)
    return t[:, 0, top : top + y, left : left + x].numpy().reshape(*lead, y, x)


# --------------------------------------------------------------------------------------------------
# 2D training slices
# --------------------------------------------------------------------------------------------------


class _SliceDataset:
    """(expression, canonical slice) items of one split, for 2D training (see ``docs/data.md``).

    Args:
        dataset: a :class:`ReferringDataset` or its folder.
        split: a split name (or ``"all"``).
        in_slices: k adjacent slices stacked as channels.
        image_size: model input side.
        hu_window: HU window for ``normalize_hu``.
        negatives_fraction: for positive expressions, the approximate fraction of their items that are
            presence negatives (slices of the case without the target).
        slice_sampling: ``"lesion"`` (target slices + sampled negatives) or ``"all"`` (every slice).
        augment: small intensity jitter and scale/translation (no flips).
        seed: seeds the negative-slice sampling and the augmentation.
        crowded_repeat: how many times each item whose slice also shows a lesion its expression
            does not refer to appears (records with ``targets``; see :func:`other_lesion_on_slice`).
            These are the items where the words, not the image, must pick the lesion; 1 = once,
            as every other item.
        decidable_only: leave out the items whose slice shows their target beside another lesion
            and where only the volume decides which one the words mean
            (:func:`~lsms_core.data.expressions.decided_on_slice`: superior/inferior, dome, segment,
            size in mm, a superlative the slice's areas get wrong). Records without a query are kept.
        appearance_classes: lesion types (e.g. ``("cyst", "metastasis", "hypervascular")``); when
            given, each item also holds ``"appearance"``: ``(len(appearance_classes), S, S)`` maps,
            channel ``k`` marking the pixels of every lesion on the slice of type ``k``
            (:meth:`ReferringDataset.lesion_kinds`; lesions of unrecorded or other types are in no
            channel). The model's appearance head learns from them (``LSMSConfig.appearance_head``).
    """

    def __init__(
        self,
        dataset: ReferringDataset | str | os.PathLike,
        split: str,
        *,
        in_slices: int = 1,
        image_size: int = 256,
        hu_window: tuple[float, float] = (-160.0, 240.0),
        negatives_fraction: float = 0.25,
        slice_sampling: str = "lesion",
        augment: bool = False,
        seed: int = 0,
        crowded_repeat: int = 1,
        decidable_only: bool = False,
        appearance_classes: Sequence[str] | None = None,
    ):
        self.dataset = dataset if isinstance(dataset, ReferringDataset) else ReferringDataset(dataset)
        if slice_sampling not in ("lesion", "all"):
            raise ValueError(f"slice_sampling must be 'lesion' or 'all', got {slice_sampling!r}")
        if not 0.0 <= negatives_fraction < 1.0:
            raise ValueError(f"negatives_fraction must be in [0, 1), got {negatives_fraction}")
        adjacent_slices(0, in_slices, 1)  # validates in_slices
        if not isinstance(crowded_repeat, int) or crowded_repeat < 1:
            raise ValueError(f"crowded_repeat must be an integer >= 1, got {crowded_repeat!r}")
        self.split_name = split
        self.in_slices, self.image_size, self.hu_window = in_slices, image_size, tuple(hu_window)
        self.negatives_fraction, self.slice_sampling = negatives_fraction, slice_sampling
        self.augment, self.seed, self.crowded_repeat = augment, seed, crowded_repeat
        self.decidable_only = bool(decidable_only)
        self.appearance_classes = None if appearance_classes is None else tuple(appearance_classes)
        self.records = self.dataset.expressions(split)
        if not self.records:
            raise ValueError(f"{self.dataset.root}: split {split!r} has no expressions; nothing to train on")
        self._target_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.items: list[tuple[int, int, bool]] = self._build_index(np.random.default_rng(seed))
        #: The generator behind the augmentations; the Trainer checkpoints its state for exact resume.
        self.augmentation_rng = np.random.default_rng(seed + 1)

    def __len__(self) -> int:
        return len(self.items)

    def _target_slices(self, record: dict) -> list[int]:
        info = self.dataset.case_info(record["case"])
        if "mask" in record:
            mask = self._target(record)
            return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1)).tolist()
        zs: set[int] = set()
        for t in record.get("targets", []):
            zs.update(info["lesions"][str(t)]["slices"])
        return sorted(zs)

    def _build_index(self, rng: np.random.Generator) -> list[tuple[int, int, bool]]:
        """Items as (record index, z, target present); deterministic for ``rng``'s seed."""
        items: list[tuple[int, int, bool]] = []
        negative_records: list[int] = []
        positive_counts: list[int] = []
        neg_per_pos = self.negatives_fraction / (1.0 - self.negatives_fraction)
        for i, record in enumerate(self.records):
            target = self._target_slices(record)
            if self.slice_sampling == "all":
                depth, present = self.dataset.case_info(record["case"])["shape"][0], set(target)
                items += [(i, z, z in present) for z in range(depth)]
            elif not target:
                negative_records.append(i)
            else:
                positive_counts.append(len(target))
                items += [(i, z, True) for z in target]
                free = sorted(set(self._candidate_slices(record)) - set(target))
                n_neg = min(len(free), round(len(target) * neg_per_pos))
                items += [(i, int(z), False) for z in rng.choice(free, size=n_neg, replace=False)]
        # A negative expression gets as many (organ) slices as an average positive expression.
        per_negative = max(1, round(float(np.mean(positive_counts)))) if positive_counts else 4
        for i in negative_records:
            candidates = self._candidate_slices(self.records[i])
            chosen = rng.choice(candidates, size=min(per_negative, len(candidates)), replace=False)
            items += [(i, int(z), False) for z in chosen]
        if self.decidable_only:
            items = [
                (i, z, present)
                for i, z, present in items
                if not (present and self.dataset.decided_on_slice(self.records[i], z) == SLICE_DECIDERS[2])
            ]
        if self.crowded_repeat > 1:
            repeats = [
                self.crowded_repeat if self.shows_other_lesion(self.records[i], z) else 1 for i, z, _ in items
            ]
            items = [item for item, n in zip(items, repeats) for _ in range(n)]
        return items

    def shows_other_lesion(self, record: dict, z: int) -> bool | None:
        """Whether slice ``z`` of ``record``'s case also shows a lesion the expression does not refer
        to; ``None`` for a record with a drawn mask instead of ``targets`` (which lesion it is, is
        not recorded). Training repeats these items (``crowded_repeat``); evaluation reports them
        apart (:data:`lsms_core.evaluate.SLICE_CONTENT_GROUPS`)."""
        if "targets" not in record:
            return None
        lesions = self.dataset.case_info(record["case"])["lesions"]  # cached by the dataset
        return other_lesion_on_slice(z, record["targets"], lesions)

    def _candidate_slices(self, record: dict) -> list[int]:
        """Slices negatives are drawn from: the organ's slices (all slices without an organ mask),
        within the record's ``slices`` range(s) when it has them."""
        info = self.dataset.case_info(record["case"])
        candidates = info.get("organ_slices") or list(range(info["shape"][0]))
        if "slices" in record:
            ranges = slice_ranges(record["slices"])
            candidates = [z for z in candidates if any(z0 <= z <= z1 for z0, z1 in ranges)] or candidates
        return candidates

    def _target(self, record: dict) -> np.ndarray:
        key = record["id"]
        if key not in self._target_cache:
            case = self.dataset.load_case(record["case"])
            self._target_cache[key] = self.dataset.target_mask(record, case)
            while len(self._target_cache) > 16:
                self._target_cache.popitem(last=False)
        return self._target_cache[key]

    def __getitem__(self, index: int) -> dict:
        import torch

        record_index, z, present = self.items[index]
        record = self.records[record_index]
        case = self.dataset.load_case(record["case"])
        depth = case.image.array.shape[0]
        stack = case.image.array[adjacent_slices(z, self.in_slices, depth)]
        image = prepare_slices(stack, self.image_size, self.hu_window)
        lesions = case.lesions[z]
        in_targets = np.isin(lesions, record["targets"]) if "targets" in record else None
        if present:
            target = self._target(record)[z] if "mask" in record else in_targets
            mask = prepare_mask(target, self.image_size)
        else:
            mask = np.zeros((1, self.image_size, self.image_size), dtype=np.float32)
        if in_targets is None:  # a drawn mask does not say which lesion it is: no distractors known
            distractor = np.zeros_like(mask)
        else:
            distractor = prepare_mask((lesions > 0) & ~in_targets, self.image_size) * (1.0 - mask)
        maps = [mask, distractor]
        if self.appearance_classes is not None:
            kinds = self.dataset.lesion_kinds(record["case"])
            maps += [
                prepare_mask(np.isin(lesions, [i for i, k in kinds.items() if k == name]), self.image_size)
                for name in self.appearance_classes
            ]
        if self.augment:
            maps = list(self._augment(image, *maps))
            image = maps.pop(0)
        mask, distractor = maps[0], maps[1]
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)),
            "distractor": torch.from_numpy(np.ascontiguousarray(distractor, dtype=np.float32)),
            "text": record["expression"],
            "present": float(present),
            "case": record["case"],
            "z": int(z),
            "kind": str(record.get("kind", "")),
            "id": str(record["id"]),
        }
        if self.appearance_classes is not None:
            item["appearance"] = torch.from_numpy(
                np.ascontiguousarray(np.concatenate(maps[2:]), dtype=np.float32)
            )
        return item

    def _augment(self, image: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, ...]:
        """Same small scale/translation for the image and its masks, intensity jitter for the image.
        No flips."""
        import torch
        import torch.nn.functional as F

        rng = self.augmentation_rng
        scale = rng.uniform(0.9, 1.1)
        tx, ty = rng.uniform(-0.05, 0.05, size=2) * 2  # normalised coordinates span [-1, 1]
        theta = torch.tensor([[[1 / scale, 0.0, tx], [0.0, 1 / scale, ty]]], dtype=torch.float32)
        img_t = torch.from_numpy(image)[None]
        grid = F.affine_grid(theta, list(img_t.shape), align_corners=False)
        image = F.grid_sample(img_t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
            0
        ].numpy()
        stacked = torch.from_numpy(np.concatenate(masks))[None]
        moved = F.grid_sample(stacked, grid, mode="nearest", align_corners=False)[0].numpy()
        image = np.clip(image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05), 0.0, 1.0)
        return (image.astype(np.float32), *(m[None].astype(np.float32) for m in moved))


def __getattr__(name: str):
    # ``SliceDataset`` subclasses ``torch.utils.data.Dataset``; it is built on first use so that
    # importing this module (e.g. from the napari plugin for DatasetWriter) does not import torch.
    if name == "SliceDataset":
        from torch.utils.data import Dataset

        cls = type(
            "SliceDataset",
            (_SliceDataset, Dataset),
            {"__module__": __name__, "__doc__": _SliceDataset.__doc__},
        )
        globals()["SliceDataset"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
