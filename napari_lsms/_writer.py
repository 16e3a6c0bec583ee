"""npe2 writer: save a Labels layer as NIfTI/NRRD/MHA in the geometry of the CT it was drawn on.

The geometry comes from ``meta["metadata"]["lsms_volume"]``, which the reader puts on CT images
and the segment widget copies onto the Labels layers it makes. A Labels layer without it (e.g.
drawn by hand on an image from another reader) is written with the layer's ``scale`` and
``translate`` and an identity direction, with a warning, because its orientation is a guess.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lsms_core.io import SINGLE_FILE_SUFFIXES as WRITE_SUFFIXES  # one file per layer, as napari saves
from napari_lsms._reader import volume_for_layer_data


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer's ``data`` to ``path`` (atomic) and return ``[path]``.

    Raises ``ValueError`` for an unsupported file extension, data that is not a 3D integer label
    map, or data whose shape differs from the CT its geometry belongs to.
    """
    from lsms_core.io import write_volume

    name = meta.get("name", "labels")
    if not str(path).lower().endswith(WRITE_SUFFIXES):
        raise ValueError(
            f"cannot save Labels layer {name!r} to {path}: unsupported extension; "
            f"use one of {', '.join(WRITE_SUFFIXES)}"
        )
    array = _label_array(data, name)
    volume, exact = volume_for_layer_data(array, meta.get("metadata"), meta.get("scale"), meta.get("translate"))
    if not exact:
        warnings.warn(
            f"Labels layer {name!r} carries no CT geometry (it was not made on an image opened with "
            f"napari-lsms): {path} is written with the layer's scale/translate and an identity "
            "direction; open the CT with napari-lsms and draw on it to keep its orientation",
            UserWarning,
            stacklevel=2,
        )
    write_volume(path, volume.array, like=volume)
    return [str(Path(path))]


def _label_array(data: Any, name: str) -> np.ndarray:
    """The layer data as a 3D unsigned integer array small enough for the label values."""
    if isinstance(data, (list, tuple)):  # multiscale: the first level is full resolution
        data = data[0]
    array = np.asarray(data)
    if array.ndim != 3:
        raise ValueError(
            f"Labels layer {name!r} has {array.ndim} dimensions {array.shape}; only 3D (z, y, x) label "
            "maps can be saved as CT masks"
        )
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        raise ValueError(f"Labels layer {name!r} has non-integer data ({array.dtype}); convert it to labels first")
    if array.size and array.min() < 0:
        raise ValueError(f"Labels layer {name!r} has negative label values; labels must be >= 0")
    high = int(array.max()) if array.size else 0
    dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16 if high <= np.iinfo(np.uint16).max else np.uint32
    return array.astype(dtype, copy=False)
