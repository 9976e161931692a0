"""Scores of one case: per annotated slice, per vertebral level and per case, for every label.

Dice counts only annotated voxels (one np.bincount over (slice, truth, prediction) gives every
slice's confusion matrix). HD95 and NSD come from evaluation/surface.py, slice by slice in 2D; the
per-level and per-case values pool the contour points of the slices they cover (each distance still
measured within its own slice). NaN marks "not scored": the label is absent from both masks there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.surface import (
    ContourPair,
    SurfaceScores,
    match_contours,
    score_surfaces,
)

HD_PERCENT = 95.0


@dataclass(frozen=True)
class Scores:
    """Scores of one grouping (slices, levels or the whole case): arrays of shape (groups, K)."""

    overlap_px: np.ndarray  # true positives
    truth_px: np.ndarray
    prediction_px: np.ndarray
    dice: np.ndarray  # NaN where not scored
    hd95_mm: np.ndarray
    nsd: np.ndarray
    truth_area_cm2: np.ndarray  # summed over the group's slices
    prediction_area_cm2: np.ndarray
    n_slices: np.ndarray  # (groups,) annotated slices in the group


@dataclass(frozen=True)
class CaseScores:
    per_slice: Scores  # groups = annotated slices, in stack order
    per_level: Scores  # groups = levels (index into the level names); n_slices 0 where no slice has that level
    per_case: Scores  # one group
    worst_hd_mm: float


def count_confusion(truth_syx: np.ndarray, prediction_syx: np.ndarray, *, n_labels: int) -> np.ndarray:
    """(S, K+1, K+1) confusion counts per slice over annotated voxels (truth code K+1 is unannotated).

    Counts a compact key (slice, truth, prediction) per voxel; the unannotated truth code gets its own
    bins, dropped afterwards, so no voxel needs masking. When the key fits 16 bits (13 slices of 22
    labels do) a radix sort and a binary search count it about twice as fast as np.bincount.
    """
    n_slices = truth_syx.shape[0]
    rows, size = n_labels + 2, n_labels + 1  # truth codes 0..K+1, prediction codes 0..K
    n_bins = n_slices * rows * size
    dtype = np.uint16 if n_bins <= 1 << 16 else np.uint32
    key = truth_syx.astype(dtype) * dtype(size)
    key += prediction_syx
    key += (np.arange(n_slices, dtype=dtype) * dtype(rows * size))[:, None, None]
    if dtype is np.uint16:
        edges = np.searchsorted(np.sort(key.ravel()), np.arange(n_bins + 1))
        counts = np.diff(edges)
    else:
        counts = np.bincount(key.ravel(), minlength=n_bins)
    return counts.reshape(n_slices, rows, size)[:, :size, :]


def _group_sum(values: np.ndarray, group_of_slice: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.zeros((n_groups,) + values.shape[1:], dtype=values.dtype)
    kept = group_of_slice >= 0
    np.add.at(out, group_of_slice[kept], values[kept])
    return out


def _scores(confusion: np.ndarray, surfaces: SurfaceScores, *, group_of_slice: np.ndarray, n_groups: int, pixel_area_mm2: float) -> Scores:
    overlap = np.diagonal(confusion, axis1=1, axis2=2)[:, 1:]
    truth = confusion.sum(axis=2)[:, 1:]
    prediction = confusion.sum(axis=1)[:, 1:]
    overlap, truth, prediction = (_group_sum(a, group_of_slice, n_groups) for a in (overlap, truth, prediction))
    total = truth + prediction
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * overlap / total, np.nan)
    return Scores(
        overlap_px=overlap,
        truth_px=truth,
        prediction_px=prediction,
        dice=dice,
        hd95_mm=surfaces.hd95_mm,
        nsd=surfaces.nsd,
        truth_area_cm2=truth * pixel_area_mm2 / 100.0,
        prediction_area_cm2=prediction * pixel_area_mm2 / 100.0,
        n_slices=np.bincount(group_of_slice[group_of_slice >= 0], minlength=n_groups),
    )


def score_case(
    truth_syx: np.ndarray,
    prediction_syx: np.ndarray,
    *,
    n_labels: int,
    spacing_rc_mm: tuple[float, float],
    tolerance_mm: float,
    level_of_slice: np.ndarray,
    n_levels: int,
) -> CaseScores:
    """Score a case from its annotated slices (codes: 0 background, 1..K labels, K+1 unannotated in the truth).

    `level_of_slice`: (S,) index of each slice's vertebral level, -1 where unknown.
    """
    if truth_syx.shape != prediction_syx.shape:
        raise ValueError(f"truth {truth_syx.shape} and prediction {prediction_syx.shape} stacks differ")
    confusion = count_confusion(truth_syx, prediction_syx, n_labels=n_labels)
    unannotated = truth_syx == n_labels + 1
    if unannotated.any():  # contours only inside the annotated region
        truth_syx = np.where(unannotated, 0, truth_syx)
        prediction_syx = np.where(unannotated, 0, prediction_syx)
    pair: ContourPair = match_contours(truth_syx, prediction_syx, spacing_rc_mm=spacing_rc_mm, n_labels=n_labels)
    rows, cols = truth_syx.shape[1:]
    worst = float(np.hypot(rows * spacing_rc_mm[0], cols * spacing_rc_mm[1]))  # the slice's diagonal
    pixel_area = float(spacing_rc_mm[0] * spacing_rc_mm[1])
    n_slices = truth_syx.shape[0]
    groupings = {
        "per_slice": (np.arange(n_slices), n_slices),
        "per_level": (np.asarray(level_of_slice, dtype=np.int64), n_levels),
        "per_case": (np.zeros(n_slices, dtype=np.int64), 1),
    }
    out = {}
    for name, (group_of_slice, n_groups) in groupings.items():
        surfaces = score_surfaces(
            pair, group_of_slice=group_of_slice, n_groups=max(n_groups, 0), n_labels=n_labels,
            tolerance_mm=tolerance_mm, worst_mm=worst, percent=HD_PERCENT,
        )
        out[name] = _scores(confusion, surfaces, group_of_slice=group_of_slice, n_groups=n_groups, pixel_area_mm2=pixel_area)
    return CaseScores(worst_hd_mm=worst, **out)
