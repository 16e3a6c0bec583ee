"""napari-lsms: segment liver lesions in CT from a description, with the LSMS model.

This package is the napari plugin (reader, writer, sample data, segment and fine-tune widgets);
the engine is ``lsms_core``. Importing it is cheap: napari, Qt, torch and transformers are imported
only when a widget or a reader actually runs, so napari's start-up does not pay for them.
"""

from __future__ import annotations

from lsms_core._common import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "get_reader": "napari_lsms._reader",
    "write_labels": "napari_lsms._writer",
    "sample_ct": "napari_lsms._sample_data",
    "SegmentWidget": "napari_lsms._widget",
    "FineTuneWidget": "napari_lsms._finetune_widget",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
