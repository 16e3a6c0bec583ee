"""npe2 reader: open a CT volume (NIfTI, NRRD, MHA/MHD, DICOM series) as a napari Image layer.

The layer shows Hounsfield units with an abdomen window and keeps the file's full geometry in
``metadata["lsms_volume"]`` (a JSON-like dict, see :func:`geometry_from_volume`) so that masks made
on it can be written back in the source geometry (``_writer.write_labels``) and so that the
segment widget can hand the model a correctly oriented :class:`lsms_core.io.Volume`.

Only ``numpy`` is imported at module level: SimpleITK is imported by ``lsms_core.io`` when a file
is actually read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsms_core.intensity import WINDOW_PRESETS, level_width_to_range
from lsms_core.io import DETACHED_SUFFIXES, SINGLE_FILE_SUFFIXES

#: Key of the geometry dict in a layer's ``metadata``.
GEOMETRY_KEY = "lsms_volume"
#: Key of the referring expressions offered as suggestions (set by the sample data).
EXPRESSIONS_KEY = "lsms_expressions"

VOLUME_SUFFIXES = SINGLE_FILE_SUFFIXES + DETACHED_SUFFIXES
DICOM_SUFFIX = ".dcm"
_IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# A folder is a DICOM series when one of its first files is DICOM; never scan huge folders fully.
_MAX_FILES_PROBED = 64

LayerData = tuple[Any, dict, str]


# ---------------------------------------------------------------------------------------------
# Geometry helpers shared by the reader, the writer, the sample data and the segment widget
# ---------------------------------------------------------------------------------------------


def geometry_from_volume(volume) -> dict:
    """The geometry of a :class:`~lsms_core.io.Volume` as a JSON-like dict for layer metadata.

    Spacing, origin and direction follow SimpleITK's (x, y, z) convention (direction flat, row
    major); ``shape`` is the array's (z, y, x) shape, used to check that the geometry still
    belongs to a layer's data.
    """
    return {
        "spacing": [float(v) for v in volume.spacing],
        "origin": [float(v) for v in volume.origin],
        "direction": [float(v) for v in volume.direction],
        "shape": [int(v) for v in np.shape(volume.array)],
        "path": None if volume.path is None else str(volume.path),
    }


def volume_from_geometry(array: np.ndarray, geometry: dict):
    """Build a :class:`~lsms_core.io.Volume` from an array and a :func:`geometry_from_volume` dict.

    Raises ``ValueError`` when the array's shape differs from the shape the geometry was made for.
    """
    from lsms_core.io import Volume

    expected = tuple(geometry.get("shape") or ())
    if expected and tuple(np.shape(array)) != expected:
        raise ValueError(
            f"array shape {tuple(np.shape(array))} does not match the CT it was made on {expected} "
            f"({geometry.get('path') or 'unsaved image'}); use a mask drawn on that image"
        )
    return Volume(
        array=np.asarray(array),
        spacing=tuple(float(v) for v in geometry["spacing"]),
        origin=tuple(float(v) for v in geometry["origin"]),
        direction=tuple(float(v) for v in geometry["direction"]),
        path=geometry.get("path"),
    )


def volume_for_layer_data(
    array: np.ndarray, metadata: dict | None, scale: Sequence[float] | None, translate: Sequence[float] | None
) -> tuple[Any, bool]:
    """The Volume for a layer's data: its stored geometry, else its ``scale``/``translate``.

    Returns ``(volume, exact)``; ``exact`` is False when the geometry had to be guessed from the
    layer's scale and translate with an identity direction (the caller should warn).
    """
    geometry = (metadata or {}).get(GEOMETRY_KEY)
    if geometry:
        return volume_from_geometry(array, geometry), True
    from lsms_core.io import Volume

    ndim = np.ndim(array)
    scale = tuple(scale) if scale is not None else (1.0,) * ndim
    translate = tuple(translate) if translate is not None else (0.0,) * ndim
    volume = Volume(
        array=np.asarray(array),
        spacing=tuple(float(v) for v in scale[::-1]),
        origin=tuple(float(v) for v in translate[::-1]),
        direction=_IDENTITY_DIRECTION,
        path=None,
    )
    return volume, False


def spatial_kwargs(volume) -> dict:
    """``scale``, ``translate`` and geometry ``metadata`` for a layer drawn on ``volume``.

    When the volume's axes are flipped with respect to LPS (e.g. a RAS NIfTI), the flips are
    added as napari's ``rotate`` matrix, so that napari's world coordinates are LPS millimetres
    and every CT is shown the radiological way (patient's right on the left of the screen,
    anterior at the top). Permuted or oblique directions are shown unrotated (their exact geometry
    is still in the metadata and used by the model and the writer).
    """
    kwargs = {
        "scale": tuple(float(v) for v in volume.scale),
        "translate": tuple(float(v) for v in volume.translate),
        "metadata": {GEOMETRY_KEY: geometry_from_volume(volume)},
    }
    flips = display_flips(volume.direction)
    if flips is not None and any(f < 0 for f in flips):
        kwargs["rotate"] = np.diag(flips).tolist()
    return kwargs


def display_flips(direction: Sequence[float]) -> tuple[float, float, float] | None:
    """The ``(z, y, x)`` axis signs of a direction that only flips axes, else None."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    signs = np.sign(np.diag(matrix))
    if not np.allclose(matrix, np.diag(signs), atol=1e-6):
        return None
    return tuple(float(v) for v in signs[::-1])


def ct_image_kwargs(volume, name: str | None = None) -> dict:
    """Image-layer keyword arguments for a CT volume: geometry, gray colormap, abdomen window."""
    kwargs = spatial_kwargs(volume)
    kwargs.update(
        name=name or _layer_name(volume.path),
        colormap="gray",
        contrast_limits=level_width_to_range(*WINDOW_PRESETS["abdomen"]),
        interpolation2d="linear",
    )
    return kwargs


# ---------------------------------------------------------------------------------------------
# The npe2 reader
# ---------------------------------------------------------------------------------------------


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read_ct` when ``path`` is a CT file or DICOM folder we can read, else None.

    npe2 calls this for every file the user opens; it must be cheap and never raise, so it only
    looks at names (and, for files without a known suffix or folders, the DICOM magic bytes).
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        return read_ct if is_supported(path) else None
    except OSError:
        return None


def is_supported(path: str | os.PathLike) -> bool:
    """True for NIfTI/NRRD/MHA/MHD files, ``.dcm`` files, DICOM files and folders holding DICOM."""
    p = Path(path)
    if p.is_dir():
        return any(_is_dicom_file(f) for f in _first_files(p))
    name = p.name.lower()
    if name.endswith(VOLUME_SUFFIXES) or name.endswith(DICOM_SUFFIX):
        return p.is_file()
    return p.is_file() and _is_dicom_file(p)


def read_ct(path: str | list[str]) -> list[LayerData]:
    """Read a CT volume with :func:`lsms_core.io.read_volume` into one Image layer-data tuple."""
    from lsms_core.io import read_volume

    if isinstance(path, (list, tuple)):
        path = path[0]
    volume = read_volume(path)
    return [(volume.array, ct_image_kwargs(volume), "image")]


def _layer_name(path: str | os.PathLike | None) -> str:
    if not path:
        return "CT"
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES + (DICOM_SUFFIX,), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _first_files(folder: Path):
    count = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file():
                yield Path(entry.path)
                count += 1
                if count >= _MAX_FILES_PROBED:
                    return


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry the magic ``DICM`` after a 128-byte preamble."""
    if path.name.lower().endswith(DICOM_SUFFIX):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:  # unreadable file: not ours to open
        return False
