"""Corrections dataset: fine-tuning records written by the napari plugin.

When a user fixes a mask the model produced and presses "Save correction", the plugin calls
:meth:`CorrectionsDataset.add`. The folder it writes **is a dataset in the LSMS dataset format**
(``docs/data.md``), so ``lsms train --data <folder>`` trains on it directly::

    corrections/
      dataset.json                      {"format": "lsms-dataset", "name": "corrections", "source": "correction", ...}
      cases/<hash16>/image.nii.gz       the CT, stored once per content hash
      cases/<hash16>/lesions.nii.gz     empty instance map (records carry their own masks)
      cases/<hash16>/masks/<id>_model.nii.gz      what the model produced
      cases/<hash16>/masks/<id>_corrected.nii.gz  what the user corrected it to (the target)
      expressions.jsonl                 one record per correction, its "mask" the corrected mask
      splits.json                       deterministic case-level train/val assignment

Splits are case-level, as everywhere in the dataset format: all corrections of one image are either
trained on or held out for validation, so the fine-tune widget's before/after figures on the
``val`` corrections never score an image the model was fine-tuned on. They are validation figures,
not an independent test: fine-tuning picks its best checkpoint and stops early on the same split,
so the "after" figure is optimistic (there is no test split).

Every write is atomic (temporary file + ``os.replace`` via :mod:`lsms_core._atomic`) and nothing
is ever overwritten: record ids are unique, an image already stored is reused, and
``expressions.jsonl`` is rewritten with the previous lines kept byte-identical. A crash at any
point therefore leaves a dataset that opens and holds every record written before; at worst a few
unreferenced mask files remain. The one exception is asked for explicitly: ``add(..., replace=True)``
drops the earlier records of the same image and description (see :meth:`CorrectionsDataset.add`).

A correction made on part of the volume (the plugin's "current slice" and "slice range" scopes)
keeps the reviewed range in the record's ``slices`` field (inclusive, canonical slice numbers, as
everywhere in the dataset format), so training draws its "lesion absent" slices only from slices
the user actually looked at.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lsms_core._atomic import atomic_write_bytes

if TYPE_CHECKING:  # SimpleITK is heavy: lsms_core.io is imported only when something is written
    from lsms_core.io import Volume

#: Fraction of cases (images) held out for validation (assigned by a hash of the case id).
VAL_FRACTION = 0.2

DATASET_NAME = "corrections"
SOURCE = "correction"


def volume_sha256(image: Volume) -> str:
    """SHA-256 of a volume's voxels (dtype, shape, bytes) and geometry (spacing, origin, direction)."""
    array = np.ascontiguousarray(image.array)
    digest = hashlib.sha256()
    header = {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "spacing": [round(float(v), 6) for v in image.spacing],
        "origin": [round(float(v), 6) for v in image.origin],
        "direction": [round(float(v), 6) for v in image.direction],
    }
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    digest.update(array.tobytes())
    return digest.hexdigest()


def description_key(description: str) -> str:
    """The key under which two descriptions are "the same": whitespace collapsed, case ignored."""
    return " ".join(str(description).split()).casefold()


def canonical_slice_range(image: Volume, slices: tuple[int, int] | None) -> list[int] | None:
    """A record's ``slices`` field for a correction reviewed on input slices ``slices``.

    Args:
        image: the CT, in its file orientation.
        slices: ``(z0, z1)``: input slices ``z0`` (inclusive) to ``z1`` (exclusive) of
            ``image.array``, as :meth:`lsms_core.infer.Segmenter.segment` takes them; None for all.

    Returns:
        ``[c0, c1]``, the inclusive range of canonical slices (``docs/data.md``) holding exactly
        those input slices, or None when the range covers the whole volume (no restriction).

    Raises:
        ValueError: an empty or out-of-bounds range, or a partial range on an image whose slice
            axis is not the canonical (axial) one: there the reviewed voxels cut across every
            canonical slice, so no slice range can say which slices were reviewed.
    """
    from lsms_core.io import canonical_axes

    depth = int(np.shape(image.array)[0])
    if slices is None:
        return None
    try:
        z0, z1 = (int(v) for v in slices)
    except (TypeError, ValueError):
        raise ValueError(f"slices: expected a (z0, z1) pair of integers, got {slices!r}") from None
    if not 0 <= z0 < z1 <= depth:
        raise ValueError(
            f"slices: {slices!r} must satisfy 0 <= z0 < z1 <= {depth} (the image has {depth} slices)"
        )
    if (z0, z1) == (0, depth):
        return None
    perm, flip = canonical_axes(image.direction)
    if perm[2] != 2:
        raise ValueError(
            f"slices: the image's slice axis is not axial (sagittal or coronal file), so a correction "
            f"reviewed on slices {z0}..{z1 - 1} only cannot be recorded; segment all slices, correct, then save"
        )
    if flip[2]:
        return [depth - z1, depth - 1 - z0]
    return [z0, z1 - 1]


def _hash_key(case_id: str) -> bytes:
    return hashlib.sha256(case_id.encode("utf-8")).digest()


def assign_splits(case_ids: list[str]) -> dict[str, list[str]]:
    """Split case ids into ``{"train": [...], "val": [...], "test": []}``, deterministically.

    A case goes to val when its hash falls in the lowest ``VAL_FRACTION``, independently of the
    other cases, so adding cases never moves an existing one. Once there are at least two cases,
    at least one is held out (the one with the smallest hash) and at least one trains (the largest).
    """
    ids = sorted(set(case_ids))
    val = {case for case in ids if int.from_bytes(_hash_key(case)[:4], "big") / 2**32 < VAL_FRACTION}
    if len(ids) >= 2:
        ranked = sorted(ids, key=_hash_key)
        if not val:
            val = {ranked[0]}
        val.discard(ranked[-1])
    return {"train": [c for c in ids if c not in val], "val": [c for c in ids if c in val], "test": []}


class CorrectionsDataset:
    """A growing dataset of user corrections in the LSMS dataset format.

    Args:
        root: the dataset folder; created with its ``dataset.json`` on the first :meth:`add`.

    Example::

        ds = CorrectionsDataset(models_home() / "corrections")
        ds.add(volume, "the large lesion in segment VII", model_mask, corrected_mask,
               model_version="lsms-base-1")
        len(ds)  # -> 1
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    # ------------------------------------------------------------------ reading

    @property
    def expressions_path(self) -> Path:
        return self.root / "expressions.jsonl"

    def records(self) -> list[dict]:
        """All records in the order they were added (an empty list before the first one).

        Read through :class:`~lsms_core.data.dataset.ReferringDataset`, so a damaged folder fails
        with the same clear errors as training would.
        """
        from lsms_core.data.dataset import ReferringDataset

        if not (self.root / "dataset.json").exists():
            return []
        return ReferringDataset(self.root).expressions()

    def __len__(self) -> int:
        return len(self.records())

    def splits(self) -> dict[str, list[str]]:
        """The case-level train/val assignment of the images that have records."""
        return assign_splits([record["case"] for record in self.records()])

    def split_records(self, split: str) -> list[dict]:
        """The records whose image is in ``split`` (``"train"`` or ``"val"``)."""
        cases = set(self.splits()[split])
        return [record for record in self.records() if record["case"] in cases]

    def __repr__(self) -> str:
        return f"CorrectionsDataset(root={str(self.root)!r}, records={len(self)})"

    # ------------------------------------------------------------------ writing

    def check_writable(self) -> None:
        """Raise ``ValueError`` unless files can be created in :attr:`root` (creating it if needed).

        Checks permissions with ``os.access`` and then by creating and removing a probe file, so
        that read-only mounts and permission problems are reported before anything is written.
        """
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(
                f"corrections folder {self.root}: {existing} is a file, not a folder; "
                "choose another corrections folder"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(
                f"corrections folder {self.root}: no write permission in {existing}; "
                "choose a folder you can write to (e.g. set LSMS_HOME) or fix its permissions"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ValueError(
                f"corrections folder {self.root}: cannot write there ({err.strerror or err}); "
                "choose a folder you can write to (e.g. set LSMS_HOME) or fix its permissions"
            ) from err

    def add(
        self,
        image: Volume,
        description: str,
        model_mask: np.ndarray,
        corrected_mask: np.ndarray,
        *,
        model_version: str,
        image_ref: str | None = None,
        slices: tuple[int, int] | None = None,
        replace: bool = False,
    ) -> dict:
        """Store one correction and return its record.

        Args:
            image: the CT the model segmented (any orientation; its geometry is kept).
            description: the text the user typed; becomes the record's ``expression``.
            model_mask: the model's binary mask, same shape as ``image.array``. All zeros when the
                model found nothing (the user painted a lesion it missed, or confirmed its absence).
            corrected_mask: the user's corrected mask (the training target), same shape.
            model_version: the version of the model that produced ``model_mask``.
            image_ref: where the image came from (a file path); defaults to ``image.path``.
            slices: the input slices the model segmented and the user reviewed, ``(z0, z1)`` with
                ``z1`` exclusive (the numbering of ``image.array`` and of ``Segmenter.segment``);
                None for the whole volume. Stored as the record's canonical ``slices`` (see
                :func:`canonical_slice_range`), which keeps training's "absent" slices inside it.
            replace: when True, earlier records of the same image (content hash) and the same
                description (ignoring case and spacing) are removed in the same atomic rewrite of
                ``expressions.jsonl`` and their mask files deleted afterwards; the new record lists
                their ids in ``"replaces"`` and its ``slices`` covers theirs too (the corrected mask
                still holds what was reviewed before). When False (the default) every call adds a
                record.

        Returns:
            the record appended to ``expressions.jsonl``.
        """
        description = (description or "").strip()
        if not description:
            raise ValueError("description: empty; type the description the mask was segmented from")
        shape = tuple(np.shape(image.array))
        if len(shape) != 3:
            raise ValueError(f"image: expected a 3D (z, y, x) volume, got shape {shape}")
        masks = {}
        for name, mask in (("model_mask", model_mask), ("corrected_mask", corrected_mask)):
            mask = np.asarray(mask)
            if mask.shape != shape:
                raise ValueError(
                    f"{name}: shape {mask.shape} does not match the image shape {shape}; "
                    "pass masks on the image's voxel grid"
                )
            masks[name] = (mask > 0).astype(np.uint8)
        reviewed = canonical_slice_range(image, slices)

        self.check_writable()
        self._check_is_corrections_dataset()
        with self._lock():
            return self._add(
                image,
                description,
                masks,
                model_version=model_version,
                image_ref=image_ref,
                reviewed=reviewed,
                replace=replace,
            )

    def _add(
        self,
        image: Volume,
        description: str,
        masks: dict,
        *,
        model_version: str,
        image_ref,
        reviewed,
        replace,
    ) -> dict:
        from lsms_core.data.dataset import LESIONS_FILE, DatasetWriter, union_slice_ranges
        from lsms_core.io import write_volume

        shape = tuple(image.array.shape)
        writer = DatasetWriter(
            self.root,
            name=DATASET_NAME,
            description="Masks corrected by users of the napari-lsms plugin, for fine-tuning.",
            provenance={"source": SOURCE},
            exist_ok=True,
            extra={"source": SOURCE},
        )

        sha = volume_sha256(image)
        case = sha[:16]
        # The lesion map is written after the image: a case without it was interrupted, redo it.
        # Its lesion map stays empty; each record's "mask" is the training target.
        if not (self.root / "cases" / case / LESIONS_FILE).exists():
            writer.add_case(case, image, np.zeros(shape, dtype=np.uint8))

        existing = self.records()
        record_id = self._new_id({record["id"] for record in existing})
        key = description_key(description)
        replaced = [
            r for r in existing if replace and r["case"] == case and description_key(r["expression"]) == key
        ]
        paths = {}
        for name, suffix in (("model_mask", "model"), ("corrected_mask", "corrected")):
            relative = f"cases/{case}/masks/{record_id}_{suffix}.nii.gz"
            if (self.root / relative).exists():  # unreachable with unique ids; never overwrite
                raise ValueError(f"{self.root / relative} already exists; refusing to overwrite it")
            write_volume(self.root / relative, masks[name], like=image)
            paths[name] = relative

        record = {
            "id": record_id,
            "case": case,
            "expression": description,
            "mask": paths["corrected_mask"],
            "model_mask": paths["model_mask"],
            "source": SOURCE,
            "kind": "correction",
            "image_ref": image_ref if image_ref is not None else getattr(image, "path", None),
            "image_sha256": sha,
            "changed_voxels": int(np.count_nonzero(masks["model_mask"] != masks["corrected_mask"])),
            "model_version": str(model_version),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if replaced:  # the label still holds what was reviewed before: all of it counts as reviewed
            reviewed = union_slice_ranges(reviewed, *(r.get("slices") for r in replaced))
        if reviewed is not None:
            record["slices"] = reviewed
        if replaced:
            record["replaces"] = [r["id"] for r in replaced]
        self._append_record(record, drop={r["id"] for r in replaced})
        writer.write_splits(assign_splits([r["case"] for r in existing] + [case]))
        for old in replaced:  # unreferenced now; a crash before this only leaves stray files
            for name in ("mask", "model_mask"):
                if isinstance(old.get(name), str):
                    with contextlib.suppress(OSError):
                        (self.root / old[name]).unlink()
        return record

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers (two napari windows saving at once) with an advisory file lock.

        ``fcntl`` is POSIX-only; elsewhere writes are not serialised (each one is still atomic).
        """
        try:
            import fcntl
        except ImportError:  # Windows
            yield
            return
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _check_is_corrections_dataset(self) -> None:
        """Refuse to add corrections to another kind of dataset (its splits would be rewritten)."""
        meta_path = self.root / "dataset.json"
        if not meta_path.exists():
            return
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{meta_path}: cannot read it ({err}); fix it or choose another folder") from err
        if not isinstance(meta, dict) or meta.get("source") != SOURCE:
            raise ValueError(
                f"{self.root} holds a dataset that is not a corrections dataset "
                f'(dataset.json has no "source": "{SOURCE}"); choose an empty or a corrections folder'
            )

    @staticmethod
    def _new_id(taken: set[str]) -> str:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        while True:
            record_id = f"corr-{stamp}-{secrets.token_hex(4)}"
            if record_id not in taken:
                return record_id

    def _append_record(self, record: dict, drop: set[str] = frozenset()) -> None:
        """Rewrite ``expressions.jsonl`` atomically: old bytes unchanged (except the lines of the
        records in ``drop``, removed), one line appended."""
        old = self.expressions_path.read_bytes() if self.expressions_path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        if drop:
            lines = old.splitlines(keepends=True)
            old = b"".join(
                line for line in lines if not line.strip() or json.loads(line).get("id") not in drop
            )
        line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        atomic_write_bytes(self.expressions_path, old + line)
