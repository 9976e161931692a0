"""HU: the check that an image is CT in Hounsfield units, and HU -> network input and back (nnU-Net's CT normalisation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import InputError

#: below this span of values (HU) a volume cannot be a CT of the trunk (air to muscle alone spans ~1000 HU)
MIN_HU_SPAN = 200.0


def check_hu_range(volume_zyx: np.ndarray, source: Path) -> None:
    """Refuse volumes that are not CT in Hounsfield units: NaN/Inf, constant, a mask (0/1) or normalised data."""
    if volume_zyx.dtype.kind == "f" and not np.isfinite(volume_zyx).all():
        raise InputError(f"{source}: image holds NaN or infinite voxels")
    low, high = float(volume_zyx.min()), float(volume_zyx.max())
    if high - low < MIN_HU_SPAN:
        what = "constant" if high == low else f"values span only {low:g} to {high:g}"
        raise InputError(f"{source}: image is {what}: not a CT in Hounsfield units (a mask, or normalised data?)")


def normalize_ct(hu: np.ndarray, *, clip_low: float, clip_high: float, mean: float, std: float) -> np.ndarray:
    """Clip to [clip_low, clip_high] (the foreground's 0.5/99.5 percentiles), then z-score; float32."""
    out = np.clip(hu, clip_low, clip_high, dtype=np.float32) if hu.dtype == np.float32 else np.clip(hu.astype(np.float32), clip_low, clip_high)
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out


def denormalize_ct(values: np.ndarray, *, mean: float, std: float) -> np.ndarray:
    """Inverse of the z-score (clipping is not invertible): network input back to (clipped) HU."""
    return values.astype(np.float32) * np.float32(std) + np.float32(mean)
