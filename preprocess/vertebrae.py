"""Vertebral levels from a vertebra label map: label schemes, resampling onto the CT grid, the level of each slice.

Shared by the algorithm (postprocess/: per-level measures) and the evaluation image (evaluation/levels.py),
so it imports nothing from either.

Label schemes (what a voxel value of the vertebra map means):
- "totalsegmentator": TotalSegmentator v2's `total` task (and its `vertebrae_body`-free subsets):
  26 S1, 27 L5, 28 L4, 29 L3, 30 L2, 31 L1, 32 T12, ..., 43 T1, 44 C7, ..., 50 C1. Every other value
  (organs, ribs, muscles, sacrum 25) is not a vertebra and is ignored.
- "levels": 1..13 are the canonical levels T4..L4 (common/labels.py LEVELS), 0 none; any other value is
  an error (the evaluation's convention).

The map may lie on any grid: it is resampled onto the CT's grid in physical space with nearest
neighbour (never matched by array index). A slice takes the vertebra with most voxels on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.labels import LEVELS
from common.errors import InputError
from preprocess.geometry import Geometry
from preprocess.io import read_image

#: every vertebra name, cranial to caudal
LEVEL_ORDER: tuple[str, ...] = tuple(
    [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 7)] + [f"S{i}" for i in range(1, 6)]
)

_TOTALSEGMENTATOR = {26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1"}
_TOTALSEGMENTATOR.update({32 + i: f"T{12 - i}" for i in range(12)})  # 32 T12 .. 43 T1
_TOTALSEGMENTATOR.update({44 + i: f"C{7 - i}" for i in range(7)})  # 44 C7 .. 50 C1

#: scheme name -> {voxel value: vertebra name}; "strict" schemes refuse values they do not name
SCHEMES: dict[str, dict[int, str]] = {
    "totalsegmentator": _TOTALSEGMENTATOR,
    "levels": {i + 1: name for i, name in enumerate(LEVELS)},
}
_STRICT = {"levels"}


def order_levels(names) -> tuple[str, ...]:
    """Level names cranial to caudal (C1..S5), unknown names after them in sorted order."""
    unique = set(names)
    known = [n for n in LEVEL_ORDER if n in unique]
    return tuple(known + sorted(unique - set(known)))


def majority_per_slice(values_syx: np.ndarray, n_values: int) -> np.ndarray:
    """Per slice (axis 0), the value in 1..n_values with most voxels on it; 0 where the slice has none."""
    n_slices = values_syx.shape[0]
    where = np.nonzero(values_syx)  # vertebrae are a few per cent of a CT: count only them
    keys = where[0].astype(np.int64) * (n_values + 1) + values_syx[where].astype(np.int64)
    counts = np.bincount(keys, minlength=n_slices * (n_values + 1)).reshape(n_slices, n_values + 1)[:, 1:]
    best = counts.argmax(axis=1) + 1
    return np.where(counts.max(axis=1) > 0, best, 0)


def reference_image(geometry: Geometry) -> sitk.Image:
    """An empty uint8 image on `geometry`'s grid (the target of a resampling)."""
    return geometry.apply_to(sitk.Image(list(geometry.size_xyz), sitk.sitkUInt8))


def vertebrae_on_grid(image: sitk.Image, geometry: Geometry, *, scheme: str, source: Path) -> np.ndarray:
    """The vertebra map on the CT grid as (z, y, x) indices into LEVEL_ORDER + 1 (0: no vertebra).

    Raises InputError when the map is not an integer label map, holds values the scheme refuses, or
    has no vertebra inside the CT's extent.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown vertebra label scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: a vertebra label map must be a 3D scalar image")
    values = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or not np.array_equal(np.rint(values), values):
            raise InputError(f"{source}: vertebra label map holds non-integer values")
        image = sitk.Cast(image, sitk.sitkInt32)
    names = SCHEMES[scheme]
    present = np.unique(sitk.GetArrayViewFromImage(image))
    if scheme in _STRICT:
        bad = [int(v) for v in present if v != 0 and int(v) not in names]
        if bad:
            raise InputError(f"{source}: values {bad[:10]} are not vertebrae in the {scheme!r} scheme (0, or {min(names)}..{max(names)})")
    resampled = sitk.Resample(image, reference_image(geometry), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    array = sitk.GetArrayFromImage(resampled)
    lookup = np.zeros(max(int(array.max(initial=0)), max(names)) + 1, dtype=np.uint8)
    for value, name in names.items():
        lookup[value] = LEVEL_ORDER.index(name) + 1
    array = np.where(array >= 0, array, 0)
    levels_zyx = lookup[array]
    if not levels_zyx.any():
        raise InputError(f"{source}: no vertebra of the {scheme!r} scheme lies inside the CT's extent (values present: {present[:12].tolist()})")
    return levels_zyx


def read_vertebrae(path: Path, geometry: Geometry, *, scheme: str) -> np.ndarray:
    """Read a vertebra label map file and put it on the CT grid (see `vertebrae_on_grid`)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a vertebra label map must be an image file, not a folder")
    return vertebrae_on_grid(read_image(path), geometry, scheme=scheme, source=path)
