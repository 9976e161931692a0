"""2D contour distances of every label on every annotated slice at once, in millimetres.

The contour model is the one of Nikolov et al. (2021), who defined the normalised surface Dice, as
DeepMind's `surface-distance` package implements it for 2D masks: contour points sit on the corners
between pixels; a corner lies on a label's contour when the 2x2 pixels around it are mixed (some of
the label, some not), and it carries the length of contour that passes through it (a lookup by the
2x2 pattern: a straight piece is one pixel spacing, a corner piece half a pixel diagonal). Each
contour point's distance is the Euclidean distance in mm (true row and column spacing) to the nearest
contour point of the other mask, on the same slice and for the same label.

Vectorised: the corner patterns of all labels on all slices come from four shifted views of the
padded label stack; nearest neighbours of all (slice, label) groups come from one k-d tree per side,
the groups laid side by side, farther apart than any in-plane distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

_BITS = np.array([8, 4, 2, 1], dtype=np.uint8)  # top-left, top-right, bottom-left, bottom-right


@dataclass(frozen=True)
class Contours:
    """Contour points of one label stack: slice, row and column of the corner, label code, length in mm."""

    slice_index: np.ndarray  # (n,) position in the stack
    row: np.ndarray  # (n,) corner row: 0 is the top edge of pixel row 0
    col: np.ndarray  # (n,) corner column
    label: np.ndarray  # (n,) code 1..K
    length_mm: np.ndarray  # (n,) contour length carried by the point


def contour_length_table(spacing_rc_mm: tuple[float, float]) -> np.ndarray:
    """Contour length (mm) through a corner for each of the 16 patterns of its 2x2 pixels (bit 8 top-left ... 1 bottom-right)."""
    row_mm, col_mm = float(spacing_rc_mm[0]), float(spacing_rc_mm[1])
    half_diagonal = 0.5 * np.sqrt(row_mm**2 + col_mm**2)
    table = np.zeros(16)
    table[[0b0001, 0b0010, 0b0100, 0b1000, 0b0111, 0b1011, 0b1101, 0b1110]] = half_diagonal  # one pixel in or out
    table[[0b0011, 0b1100]] = col_mm  # top or bottom row in: the contour runs along a row
    table[[0b0101, 0b1010]] = row_mm  # left or right column in: the contour runs along a column
    table[[0b0110, 0b1001]] = 2 * half_diagonal  # diagonal pair: two pieces
    return table


def find_contours(codes_syx: np.ndarray, spacing_rc_mm: tuple[float, float]) -> Contours:
    """Contour points of every nonzero code on every slice of a (slices, rows, cols) stack."""
    padded = np.pad(codes_syx, ((0, 0), (1, 1), (1, 1)))
    top_left, top_right = padded[:, :-1, :-1], padded[:, :-1, 1:]
    bottom_left, bottom_right = padded[:, 1:, :-1], padded[:, 1:, 1:]
    mixed = (top_left != top_right) | (top_left != bottom_left) | (top_left != bottom_right)
    s, r, c = np.nonzero(mixed)
    around = np.stack([top_left[s, r, c], top_right[s, r, c], bottom_left[s, r, c], bottom_right[s, r, c]])  # (4, n)
    same = around[:, None, :] == around[None, :, :]  # (4, 4, n): pixel p has the same code as pixel q
    patterns = np.tensordot(_BITS, same, axes=(0, 1))  # (4, n): 2x2 pattern of the code at pixel p
    first = np.ones_like(around, dtype=bool)  # count each code once per corner
    for p in range(1, 4):
        first[p] = ~same[p, :p].any(axis=0)
    keep = first & (around != 0)
    which, point = np.nonzero(keep)
    table = contour_length_table(spacing_rc_mm)
    return Contours(
        slice_index=s[point],
        row=r[point],
        col=c[point],
        label=around[which, point].astype(np.int64),
        length_mm=table[patterns[which, point]],
    )


def nearest_distances(query: Contours, reference: Contours, *, spacing_rc_mm: tuple[float, float], n_labels: int) -> np.ndarray:
    """Distance (mm) from each query point to the nearest reference point of the same slice and label; inf if none."""
    distances = np.full(query.label.size, np.inf)
    if query.label.size == 0 or reference.label.size == 0:
        return distances
    row_mm, col_mm = spacing_rc_mm
    query_group = query.slice_index * (n_labels + 1) + query.label
    reference_group = reference.slice_index * (n_labels + 1) + reference.label
    height = int(max(query.row.max(), reference.row.max())) + 1
    width = int(max(query.col.max(), reference.col.max())) + 1
    # A point on both contours (same slice, label, corner) is at distance 0: common for good
    # predictions, and found by sorting rather than by the tree.
    query_key = (query_group * height + query.row) * width + query.col
    reference_key = (reference_group * height + reference.row) * width + reference.col
    on_both = np.isin(query_key, reference_key)
    distances[on_both] = 0.0
    matched = np.isin(query_group, reference_group) & ~on_both
    if not matched.any():
        return distances
    # Groups side by side along the column axis, each `offset` mm apart: the nearest point of another
    # group is farther than any point of the same group (in-plane distances are below the diagonal).
    offset = 2.0 * (height * row_mm + width * col_mm) + 1.0
    tree = cKDTree(np.column_stack([reference.row * row_mm, reference.col * col_mm + reference_group * offset]), balanced_tree=False)
    _, nearest = tree.query(np.column_stack([query.row[matched] * row_mm, query.col[matched] * col_mm + query_group[matched] * offset]))
    # Recompute from index differences as scipy's exact EDT does: sqrt((di*sr)^2 + (dj*sc)^2).
    d_row = (query.row[matched] - reference.row[nearest]).astype(np.float64) * row_mm
    d_col = (query.col[matched] - reference.col[nearest]).astype(np.float64) * col_mm
    distances[matched] = np.sqrt(d_row * d_row + d_col * d_col)
    return distances


def weighted_percentile(
    groups: np.ndarray, values: np.ndarray, weights: np.ndarray, *, percent: float, n_groups: int, value_order: np.ndarray | None = None
) -> np.ndarray:
    """Per group, the smallest value whose cumulative weight (in value order) reaches `percent` of the group's weight.

    As surface-distance's compute_robust_hausdorff does for one group. NaN for groups without values.
    `value_order`: indices that sort `values` ascending, when known (shared by several groupings).
    """
    result = np.full(n_groups, np.nan)
    if values.size == 0:
        return result
    if value_order is None:
        value_order = np.argsort(values, kind="stable")
    by_group = groups[value_order].astype(np.uint16 if n_groups <= 1 << 16 else np.int64)
    order = value_order[np.argsort(by_group, kind="stable")]  # radix sort for 16-bit keys; ties keep value order
    groups, values, weights = groups[order], values[order], weights[order]
    totals = np.bincount(groups, weights=weights, minlength=n_groups)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    cumulative = np.cumsum(weights)
    before = np.repeat(cumulative[starts] - weights[starts], np.diff(np.r_[starts, groups.size]))
    fraction_reached = (cumulative - before) >= (percent / 100.0) * totals[groups] * (1 - 1e-12)
    ends = np.r_[starts[1:], groups.size] - 1
    fraction_reached[ends] = True  # as min(idx, len - 1): the largest value when rounding never reaches it
    hit = np.flatnonzero(fraction_reached)
    first_hit = hit[np.searchsorted(hit, starts)]
    result[groups[starts]] = values[first_hit]
    return result


@dataclass(frozen=True)
class SurfaceScores:
    hd95_mm: np.ndarray  # (n_groups, K); NaN where neither mask has the label in the group
    nsd: np.ndarray  # (n_groups, K)


@dataclass(frozen=True)
class ContourPair:
    """Both masks' contour points with their distances to the other mask (inf: other mask absent there)."""

    truth: Contours
    prediction: Contours
    truth_to_prediction_mm: np.ndarray
    prediction_to_truth_mm: np.ndarray
    truth_order: np.ndarray  # indices sorting truth_to_prediction_mm ascending
    prediction_order: np.ndarray


def match_contours(truth_syx: np.ndarray, prediction_syx: np.ndarray, *, spacing_rc_mm: tuple[float, float], n_labels: int) -> ContourPair:
    truth = find_contours(truth_syx, spacing_rc_mm)
    prediction = find_contours(prediction_syx, spacing_rc_mm)
    truth_to_prediction = nearest_distances(truth, prediction, spacing_rc_mm=spacing_rc_mm, n_labels=n_labels)
    prediction_to_truth = nearest_distances(prediction, truth, spacing_rc_mm=spacing_rc_mm, n_labels=n_labels)
    return ContourPair(
        truth=truth,
        prediction=prediction,
        truth_to_prediction_mm=truth_to_prediction,
        prediction_to_truth_mm=prediction_to_truth,
        truth_order=np.argsort(truth_to_prediction, kind="stable"),
        prediction_order=np.argsort(prediction_to_truth, kind="stable"),
    )


def score_surfaces(
    pair: ContourPair, *, group_of_slice: np.ndarray, n_groups: int, n_labels: int, tolerance_mm: float, worst_mm: float, percent: float = 95.0
) -> SurfaceScores:
    """HD (percentile) and NSD per (group, label), pooling the slices of each group; slices in group -1 are left out.

    A contour point with no counterpart (the other mask lacks the label on that slice) counts at `worst_mm`.
    """
    hd = np.full((n_groups, n_labels), -np.inf)
    within = np.zeros(n_groups * n_labels)
    total = np.zeros(n_groups * n_labels)
    seen = np.zeros(n_groups * n_labels, dtype=bool)
    sides = ((pair.truth, pair.truth_to_prediction_mm, pair.truth_order), (pair.prediction, pair.prediction_to_truth_mm, pair.prediction_order))
    for contours, distances, order in sides:
        group = group_of_slice[contours.slice_index]
        kept = group >= 0
        key = group[kept] * n_labels + contours.label[kept] - 1
        distance = np.minimum(distances[kept], worst_mm)  # capping keeps the order
        length = contours.length_mm[kept]
        position = np.cumsum(kept) - 1  # index among the kept points
        value_order = position[order[kept[order]]]
        directed = weighted_percentile(key, distance, length, percent=percent, n_groups=n_groups * n_labels, value_order=value_order)
        hd = np.fmax(hd, directed.reshape(n_groups, n_labels))
        within += np.bincount(key, weights=length * (distance <= tolerance_mm * (1 + 1e-9)), minlength=n_groups * n_labels)
        total += np.bincount(key, weights=length, minlength=n_groups * n_labels)
        seen[key] = True
    seen = seen.reshape(n_groups, n_labels)
    hd = np.where(seen, hd, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        nsd = np.where(seen, within.reshape(n_groups, n_labels) / total.reshape(n_groups, n_labels), np.nan)
    return SurfaceScores(hd95_mm=hd, nsd=nsd)
