"""HU -> network input and back, with the model card's numbers (nnU-Net's CT normalisation)."""

from __future__ import annotations

import numpy as np


def normalize_ct(hu: np.ndarray, *, clip_low: float, clip_high: float, mean: float, std: float) -> np.ndarray:
    """Clip to [clip_low, clip_high] (the foreground's 0.5/99.5 percentiles), then z-score; float32."""
    out = np.clip(hu, clip_low, clip_high, dtype=np.float32) if hu.dtype == np.float32 else np.clip(hu.astype(np.float32), clip_low, clip_high)
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out


def denormalize_ct(values: np.ndarray, *, mean: float, std: float) -> np.ndarray:
    """Inverse of the z-score (clipping is not invertible): network input back to (clipped) HU."""
    return values.astype(np.float32) * np.float32(std) + np.float32(mean)
