"""napari-lsms: segment liver lesions in CT from a description, with the LSMS model.

This package is the napari plugin (reader, writer, sample data, segment and fine-tune widgets);
the engine is ``lsms_core``. Importing it is cheap: napari, Qt, torch and transformers are imported
only when a widget or a reader actually runs, so napari's start-up does not pay for them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "get_reader": "napari_lsms._reader",
    "write_labels": "napari_lsms._writer",
    "sample_ct": "napari_lsms._sample_data",
    "SegmentWidget": "napari_lsms._widget",
    "FineTuneWidget": "napari_lsms._finetune_widget",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_lsms' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
