"""Per-muscle volume and mean HU of a label map, vectorised with np.bincount."""

from __future__ import annotations

import numpy as np

from model.labels import LABELS
from preprocess.geometry import Geometry


def measure_muscles(labels_zyx: np.ndarray, hu_zyx: np.ndarray, geometry: Geometry) -> dict[str, dict]:
    """For every canonical muscle: voxel count, volume (cm3) and mean HU (None when absent: JSON has no NaN)."""
    if labels_zyx.shape != hu_zyx.shape:
        raise ValueError(f"label map {labels_zyx.shape} and CT {hu_zyx.shape} differ in shape")
    n = len(LABELS) + 1
    flat = labels_zyx.ravel()
    counts = np.bincount(flat, minlength=n)[:n]
    sums = np.bincount(flat, weights=hu_zyx.ravel().astype(np.float64), minlength=n)[:n]
    voxel_cm3 = geometry.voxel_volume_mm3 / 1000.0
    return {
        name: {
            "label": value,
            "voxels": int(counts[value]),
            "volume_cm3": round(float(counts[value] * voxel_cm3), 3),
            "mean_hu": round(float(sums[value] / counts[value]), 2) if counts[value] else None,
        }
        for name, value in LABELS.items()
    }
