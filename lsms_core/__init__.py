"""lsms_core: the LSMS engine (model, data, training, volume inference).

The public API is imported lazily so that ``import lsms_core`` stays cheap and never pulls in
napari, Qt, torch or transformers until a name that needs them is used.
"""

from __future__ import annotations

from lsms_core._common import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "LSMSConfig": "lsms_core.model",
    "LSMS": "lsms_core.model",
    "LSMSLoss": "lsms_core.losses",
    "Volume": "lsms_core.io",
    "read_volume": "lsms_core.io",
    "write_volume": "lsms_core.io",
    "to_canonical": "lsms_core.io",
    "from_canonical": "lsms_core.io",
    "normalize_hu": "lsms_core.intensity",
    "save_model": "lsms_core.checkpoint",
    "load_model": "lsms_core.checkpoint",
    "Segmenter": "lsms_core.infer",
    "SegmentationResult": "lsms_core.infer",
    "Trainer": "lsms_core.train",
    "TrainConfig": "lsms_core.train",
    "ReferringDataset": "lsms_core.data.dataset",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
