"""CT volume I/O and canonical orientation.

Everything that reads or writes a 3D image goes through this module:

* :class:`Volume` holds a NumPy array in ``(z, y, x)`` order together with its physical geometry in
  SimpleITK's convention (``spacing``, ``origin`` in physical ``(x, y, z)`` order, ``direction`` a flat
  row-major 3x3 tuple whose *columns* are the physical directions of the index axes x, y, z).
* :func:`read_volume` reads NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
  (``.mha``, ``.mhd``) and DICOM series (a folder, or any one file of the series) through SimpleITK.
  DICOM rescale slope/intercept are applied by SimpleITK, so CT comes back in Hounsfield units.
* :func:`write_volume` writes an array (typically a label map) with exactly the geometry of another
  volume, atomically.
* :func:`to_canonical` / :func:`from_canonical` move between a file's voxel grid and the canonical
  orientation the model sees: direction = identity in LPS, i.e. array x grows toward the patient's
  **left**, y toward **posterior**, z toward **superior** (SimpleITK ``DICOMOrient(img, "LPS")``).
  Only axis permutations and flips are applied (no resampling), so the two are exact inverses.
  For an oblique direction matrix each voxel axis is assigned to the nearest patient axis (as
  ``DICOMOrient`` does); the canonical direction is then close to, but not exactly, the identity.

SimpleITK is imported lazily so that importing this module (e.g. from the napari plugin at
start-up) stays cheap; the orientation helpers only need NumPy.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import shutil
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lsms_core._atomic import atomic_path

logger = logging.getLogger(__name__)

#: File name endings read and written as single files (lower case).
SINGLE_FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Formats whose header points to a separate data file; written header-last (see write_volume).
DETACHED_SUFFIXES = (".mhd", ".nhdr")
#: Formats written with compression.
COMPRESSED_SUFFIXES = (".nii.gz", ".nrrd", ".mha", ".mhd", ".nhdr")

#: DICOM tags copied into ``Volume.metadata`` when present.
DICOM_TAGS = {
    "0008|0060": "modality",
    "0008|103e": "series_description",
    "0020|000e": "series_instance_uid",
    "0008|0020": "study_date",
    "0018|0050": "slice_thickness",
}

#: Default tolerance (mm, and absolute for direction cosines) when comparing two grids.
GRID_ATOL = 1e-3


@dataclass
class Volume:
    """A 3D image: ``array`` in ``(z, y, x)`` order plus its physical geometry.

    Args:
        array: voxel values, shape ``(z, y, x)``.
        spacing: voxel size in mm, physical ``(x, y, z)`` order (SimpleITK convention).
        origin: physical position (mm, LPS) of voxel ``array[0, 0, 0]``, ``(x, y, z)`` order.
        direction: flat row-major 3x3 matrix; column ``i`` is the physical direction of index axis
            ``i`` (x, y, z).
        path: the file or folder it was read from, if any.
        metadata: free-form information (file format, DICOM modality, series description, ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (z, y, x), got shape {self.array.shape}")
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = tuple(float(v) for v in self.direction)
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError(
                "Volume geometry must be spacing (3,), origin (3,) and a flat 3x3 direction (9,); got "
                f"{len(self.spacing)}, {len(self.origin)} and {len(self.direction)} values"
            )
        if min(self.spacing) <= 0:
            raise ValueError(f"Volume spacing must be positive, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def scale(self) -> tuple[float, float, float]:
        """Voxel size in ``(z, y, x)`` order, as napari's ``scale``."""
        return tuple(reversed(self.spacing))

    @property
    def translate(self) -> tuple[float, float, float]:
        """Origin in ``(z, y, x)`` order, as napari's ``translate`` (exact for axis-aligned images)."""
        return tuple(reversed(self.origin))

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction as a 3x3 array (columns = physical directions of index axes x, y, z)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def with_array(self, array: np.ndarray) -> Volume:
        """A copy with the same geometry, path and metadata but another array of the same shape."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(
                f"array shape {array.shape} does not match the volume's shape {self.array.shape}"
            )
        return replace(self, array=array, metadata=dict(self.metadata))

    def to_sitk(self):
        """The volume as a ``SimpleITK.Image`` (bool arrays become uint8)."""
        import SimpleITK as sitk

        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img, path: str | os.PathLike | None = None, metadata: dict | None = None) -> Volume:
        """Build a volume from a 3D scalar ``SimpleITK.Image``."""
        import SimpleITK as sitk

        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"expected a 3D scalar image, got a {img.GetDimension()}D image with "
                f"{img.GetNumberOfComponentsPerPixel()} components per pixel"
            )
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=img.GetDirection(),
            path=None if path is None else str(path),
            metadata=dict(metadata or {}),
        )


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_volume(path: str | os.PathLike, *, check_finite: bool = True) -> Volume:
    """Read a 3D image (CT in HU for CT files) from a file or a DICOM folder.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, a folder holding a
            DICOM series (with several series, the one with most slices is read and a warning names
            it), or one file of a DICOM series (its whole series is read).
        check_finite: reject images containing NaN or infinite values (CT input must be finite).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is unreadable or corrupt, the folder holds no DICOM series, or the image
            is not a 3D scalar volume (2D, 4D, RGB/vector) or contains NaNs.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; check the path (a CT file or DICOM folder)")
    if path.is_dir():
        img, metadata = _read_dicom_folder(path)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image_io = reader.GetImageIOFromFileName(str(path))
        try:
            if not image_io:
                raise RuntimeError("no image reader recognises this file")
            reader.SetImageIO(image_io)
            reader.ReadImageInformation()
            if image_io == "GDCMImageIO":
                img, metadata = _read_dicom_series_of_file(path, reader)
            else:
                img, metadata = reader.Execute(), {"format": image_io}
                if _suffix(path) in (".nii", ".nii.gz"):  # not .hdr/.img pairs
                    _check_nifti_complete(path)
        except RuntimeError as exc:
            raise _unreadable(path, exc) from None
    img = _as_3d_scalar(img, path)
    volume = Volume.from_sitk(img, path=path, metadata=metadata)
    if check_finite and volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        n_bad = int((~np.isfinite(volume.array)).sum())
        raise ValueError(
            f"{path}: the image contains {n_bad} NaN or infinite voxels; replace them (e.g. with -1024 HU "
            "for air) and save the file again"
        )
    return volume


def read_label(path: str | os.PathLike, like: Volume, *, atol: float = GRID_ATOL) -> Volume:
    """Read an integer label map that must lie on the voxel grid of ``like`` (its image).

    A label map stored with another axis order or axis flips of the *same* voxels (for example an
    RAS NIfTI mask of an LPS DICOM series) is reoriented onto ``like``'s grid; any other difference
    is an error. Float files whose values are all integers are converted to an integer type.

    Returns:
        a volume with ``like``'s geometry and an integer array of ``like.array``'s shape.

    Raises:
        ValueError: the grids differ (size, spacing, origin or direction beyond ``atol``), or the
            values are not integer labels.
    """
    label = read_volume(path)
    problems = grid_mismatch(label, like, atol=atol)
    if problems and not grid_mismatch(to_canonical(label), to_canonical(like), atol=atol):
        logger.info("%s: label map stored in another orientation; reoriented onto %s", path, like.path)
        canonical = to_canonical(label).array
        label = like.with_array(from_canonical(canonical, like))
        label.path = str(path)
        problems = []
    if problems:
        image = like.path or "its image"
        raise ValueError(
            f"{path}: the label map does not lie on the grid of {image}: {'; '.join(problems)}. "
            "Resample the label map onto the image grid (nearest neighbour) or pick the matching image"
        )
    label.array = _as_integer_labels(label.array, path)
    return label


def grid_mismatch(a: Volume, b: Volume, *, atol: float = GRID_ATOL) -> list[str]:
    """Describe how the grids of ``a`` and ``b`` differ (empty list: same grid within ``atol``)."""
    problems = []
    if a.array.shape != b.array.shape:
        problems.append(f"size (z, y, x) {a.array.shape} != {b.array.shape}")
    for name in ("spacing", "origin", "direction"):
        va, vb = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if not np.allclose(va, vb, rtol=0.0, atol=atol):
            problems.append(f"{name} {_fmt(va)} != {_fmt(vb)}")
    return problems


def _read_dicom_folder(folder: Path):
    import SimpleITK as sitk

    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ValueError(
            f"{folder}: the folder holds no DICOM series; pass a DICOM series folder or a CT file "
            "(.nii.gz, .nrrd, .mha, ...)"
        )
    files_per_series = {
        uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series_ids
    }
    uid = max(series_ids, key=lambda u: len(files_per_series[u]))
    if len(series_ids) > 1:
        counts = ", ".join(f"{u or '(no UID)'}: {len(f)} slices" for u, f in files_per_series.items())
        message = (
            f"{folder}: the folder holds {len(series_ids)} DICOM series ({counts}); reading series "
            f"{uid or '(no UID)'} with the most slices. Pass a folder with one series to choose another."
        )
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
    img, metadata = _read_dicom_files(folder, files_per_series[uid])
    metadata["n_series_in_folder"] = len(series_ids)
    return img, metadata


def _read_dicom_series_of_file(path: Path, info_reader):
    """Read the whole series that the DICOM file ``path`` belongs to."""
    import SimpleITK as sitk

    uid = info_reader.GetMetaData("0020|000e").strip() if info_reader.HasMetaDataKey("0020|000e") else ""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), uid)
    if str(path.resolve()) not in {str(Path(f).resolve()) for f in files}:
        files = (str(path),)  # the series could not be assembled: read the single file
    return _read_dicom_files(path, files)


def _read_dicom_files(path: Path, files) -> tuple[Any, dict]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    metadata: dict[str, Any] = {"format": "GDCMImageIO", "n_files": len(files)}
    for tag, key in DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, tag):
            metadata[key] = reader.GetMetaData(0, tag).strip()
    return img, metadata


def _as_3d_scalar(img, path: Path):
    """Check that ``img`` is a 3D scalar image (a 4D image with one time point is squeezed)."""
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: the image has {img.GetNumberOfComponentsPerPixel()} components per voxel (RGB or "
            "vector image); a CT must be a single-channel (grayscale) 3D volume"
        )
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, [*img.GetSize()[:3], 0], [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        kind = "a 2D image" if dim == 2 else f"a {dim}D image of size {img.GetSize()}"
        hint = (
            "pass the whole 3D CT (a NIfTI/NRRD/MHA volume or a DICOM series folder)"
            if dim < 3
            else "split it into one 3D volume per time point / phase and pass one of them"
        )
        raise ValueError(f"{path}: expected a 3D volume but the file holds {kind}; {hint}")
    return img


def _unreadable(path: Path, exc: Exception | str) -> ValueError:
    """A ``ValueError`` for an unreadable file, keeping the useful part of SimpleITK's message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR:" in line]
    detail = errors[0].split("ERROR:", 1)[1] if errors else (lines[-1] if lines else "unknown error")
    detail = detail.split("): ", 1)[-1].strip()
    return ValueError(
        f"{path}: cannot read the image (corrupt, truncated or unsupported file: {detail}); "
        "use a NIfTI (.nii/.nii.gz), NRRD, MetaImage (.mha/.mhd) file or a DICOM series folder"
    )


def _check_nifti_complete(path: Path) -> None:
    """Raise if a NIfTI file holds fewer voxel bytes than its header announces.

    ITK's NIfTI reader silently zero-fills truncated files. The header gives the expected size
    (``vox_offset`` + voxels x bytes); plain files are checked by their size, gzip-compressed ones
    (told by their magic bytes, not their name) by the gzip trailer (uncompressed size mod 2**32)
    and, when that does not match (multi-member gzip), by decompressing the stream.
    """
    with open(path, "rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"  # the gzip magic, whatever the file is named
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(540)
    except (EOFError, OSError, zlib.error):
        raise _unreadable(path, "the compressed header ends early (file truncated)") from None
    expected = _nifti_expected_bytes(header)
    if expected is None:
        return
    if not compressed:
        actual = path.stat().st_size
    else:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            if int.from_bytes(fh.read(4), "little") == expected % 2**32:
                return
        actual = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise _unreadable(path, "the compressed stream ends early (file truncated)") from None
    if actual < expected:
        raise _unreadable(path, f"the file holds {actual} bytes but its header announces {expected}")


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Total file bytes (header + voxels) announced by a NIfTI-1/2 header, or None if unknown."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(f"{endian}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{endian}8h", header[40:56])
            bitpix = struct.unpack(f"{endian}h", header[72:74])[0]
            offset = int(struct.unpack(f"{endian}f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(f"{endian}i", header[:4])[0] == 540:
            bitpix = struct.unpack(f"{endian}h", header[14:16])[0]
            dims = struct.unpack(f"{endian}8q", header[16:80])
            offset = struct.unpack(f"{endian}q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    return (
        max(offset, 352) + int(np.prod([max(d, 1) for d in dims[1 : ndim + 1]], dtype=np.int64)) * bitpix // 8
    )


def _as_integer_labels(array: np.ndarray, path) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu":
        return array
    if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
        raise ValueError(f"{path}: a label map must hold integer labels, but it has non-integer values")
    return array.astype(np.int32)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.ravel(values)) + ")"


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_volume(path: str | os.PathLike, array: np.ndarray, like: Volume) -> Path:
    """Write ``array`` (shape of ``like.array``) with exactly the geometry of ``like``, atomically.

    The format follows the file name (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``,
    ``.mhd``); compressed formats are compressed. Single-file formats are written to a temporary file
    beside ``path`` and moved over it. Detached-header formats (``.mhd``, ``.nhdr``) write their data
    file first and their header last, so a reader never sees a header without its data.
    Bool arrays are stored as uint8.

    Returns:
        the written path.
    """
    import SimpleITK as sitk

    path = check_output_path(path)
    suffix = _suffix(path)
    img = like.with_array(array).to_sitk()
    compress = suffix in COMPRESSED_SUFFIXES
    if suffix in DETACHED_SUFFIXES:
        _write_detached(img, path, compress)
    else:
        with atomic_path(path) as tmp:
            sitk.WriteImage(img, str(tmp), compress)
    return path


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path` if :func:`write_volume` can write there: a supported
    suffix and a folder that exists or can be created, writable. Call it before long work.

    Raises:
        ValueError: unsupported suffix, a folder in the way, or no permission to write.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as {path / 'mask.nii.gz'}")
    suffix = _suffix(path)
    if suffix not in SINGLE_FILE_SUFFIXES + DETACHED_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported output format {suffix or '(no suffix)'}; use one of "
            f"{', '.join(SINGLE_FILE_SUFFIXES + DETACHED_SUFFIXES)}"
        )
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{path}: cannot write in {existing}; choose another output folder")
    return path


def _write_detached(img, path: Path, compress: bool) -> None:
    """Write a header + data file pair: data files are moved in first, the header last."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        sitk.WriteImage(img, str(tmp_dir / path.name), compress)
        for written in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


# --------------------------------------------------------------------------------------------------
# Canonical orientation
# --------------------------------------------------------------------------------------------------


def canonical_axes(direction) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How a grid with ``direction`` maps onto the canonical LPS grid.

    Returns ``(perm, flip)`` in SimpleITK index order (x, y, z): canonical index axis ``p`` is the
    original index axis ``perm[p]``, reversed when ``flip[p]``. Each original axis goes to the
    patient axis it is most aligned with (the permutation maximising the summed absolute cosines),
    which for oblique images matches ``SimpleITK.DICOMOrient``'s nearest-axis choice.
    """
    d = np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3))
    perm = max(itertools.permutations(range(3)), key=lambda pm: sum(d[p, pm[p]] for p in range(3)))
    signed = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    flip = tuple(bool(signed[p, perm[p]] < 0) for p in range(3))
    return tuple(perm), flip


def to_canonical(volume: Volume) -> Volume:
    """Reorient ``volume`` to the canonical LPS grid by permuting and flipping axes (no resampling).

    The result's array x grows toward the patient's left, y toward posterior and z toward superior;
    its direction is the identity for axis-aligned input, and the physical position of every voxel is
    unchanged. Equivalent to ``SimpleITK.DICOMOrient(img, "LPS")``.
    """
    perm, flip = canonical_axes(volume.direction)
    if perm == (0, 1, 2) and not any(flip):
        return replace(volume, metadata=dict(volume.metadata))
    d = volume.direction_matrix
    spacing = np.asarray(volume.spacing)
    size_xyz = volume.array.shape[::-1]
    # Voxel that becomes canonical index (0, 0, 0): the far end of every flipped axis.
    start = [0, 0, 0]
    for p in range(3):
        if flip[p]:
            start[perm[p]] = size_xyz[perm[p]] - 1
    origin = np.asarray(volume.origin) + d @ (np.asarray(start) * spacing)
    signs = np.where(flip, -1.0, 1.0)
    new_direction = d[:, list(perm)] * signs[None, :]
    return Volume(
        array=_permute_flip(volume.array, perm, flip),
        spacing=tuple(spacing[list(perm)]),
        origin=tuple(origin),
        direction=tuple(new_direction.ravel()),
        path=volume.path,
        metadata=dict(volume.metadata),
    )


def from_canonical(array: np.ndarray, like: Volume) -> np.ndarray:
    """Map an array on ``to_canonical(like)``'s grid back onto ``like``'s grid (exact inverse).

    Args:
        array: shape ``to_canonical(like).array.shape`` (e.g. a mask predicted on canonical slices).
        like: the volume in its original orientation.
    """
    perm, flip = canonical_axes(like.direction)
    array = np.asarray(array)
    expected = _canonical_shape(like, perm)
    if array.shape != expected:
        raise ValueError(
            f"array shape {array.shape} does not match the canonical shape {expected} of the volume "
            f"{like.path or ''} (original shape {like.array.shape}); pass an array on the canonical grid"
        )
    # Undo the flips (applied on canonical numpy axes), then the transposition.
    np_flip_axes = tuple(2 - p for p in range(3) if flip[p])
    out = np.flip(array, axis=np_flip_axes) if np_flip_axes else array
    np_axes = _numpy_axes(perm)
    return np.ascontiguousarray(np.transpose(out, np.argsort(np_axes)))


def _numpy_axes(perm) -> list[int]:
    """Numpy transpose axes turning an original (z, y, x) array into canonical (z, y, x) order."""
    return [2 - perm[2 - q] for q in range(3)]


def _canonical_shape(like: Volume, perm) -> tuple[int, int, int]:
    return tuple(like.array.shape[a] for a in _numpy_axes(perm))


def _permute_flip(array: np.ndarray, perm, flip) -> np.ndarray:
    """``array`` (``(z, y, x)``, optionally followed by channel axes) on the canonical grid."""
    out = np.transpose(array, [*_numpy_axes(perm), *range(3, array.ndim)])
    np_flip_axes = tuple(2 - p for p in range(3) if flip[p])
    if np_flip_axes:
        out = np.flip(out, axis=np_flip_axes)
    return np.ascontiguousarray(out)
