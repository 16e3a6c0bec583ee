"""HU windowing and normalisation for the model.

The model's input intensity is fixed by ``LSMSConfig.hu_window`` and never by a viewer's display
contrast: CT values (Hounsfield units) are clipped to the window and scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np

#: Display presets (level, width) in HU. Display only: they never change what the model sees.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}


def level_width_to_range(level: float, width: float) -> tuple[float, float]:
    """Convert a (level, width) window to (low, high) HU."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return (level - width / 2.0, level + width / 2.0)


def normalize_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU values to ``window = (low, high)`` and scale them to float32 in [0, 1].

    Raises ``ValueError`` for an empty window or non-finite input, so that a NaN never reaches
    the model silently.
    """
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"HU window must have high > low, got {window}")
    arr = np.asarray(hu, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(
            "the CT contains NaN or infinite values; replace them (e.g. with -1024 HU for air) before segmenting"
        )
    out = (arr - low) / (high - low)
    np.clip(out, 0.0, 1.0, out=out)
    return out
