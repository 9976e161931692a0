"""Evaluation metrics against independent implementations.

Oracles: Dice from grand-challenge-metrics (what evalutils became); HD95 and NSD from DeepMind's
surface-distance (the reference implementation of the normalised surface Dice), both pinned in
requirements/evaluation-test.txt. Data: tiny seeded random label maps and hand-made shapes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

surface_distance = pytest.importorskip("surface_distance", reason="oracle surface-distance not installed (requirements/evaluation-test.txt)")
gc_stats = pytest.importorskip("grand_challenge_metrics.stats", reason="oracle grand-challenge-metrics not installed (requirements/evaluation-test.txt)")

from evaluation.labels import LabelSet  # noqa: E402
from evaluation.metrics import score_case  # noqa: E402
from evaluation.report import describe, render_metrics_json  # noqa: E402
from evaluation.surface import find_contours, match_contours, score_surfaces  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface-distance uses scipy.ndimage.filters


def random_labels(rng: np.random.Generator, shape, n_labels: int, *, smooth: float = 2.0) -> np.ndarray:
    """Blobby multi-label map: a smooth random field cut into n_labels bands plus background."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), (0, smooth, smooth))
    cuts = np.quantile(field, np.linspace(0.45, 0.95, n_labels + 1))
    labels = np.digitize(field, cuts)
    labels[labels > n_labels] = 0
    return labels.astype(np.uint8)


def oracle_surface(truth_2d: np.ndarray, prediction_2d: np.ndarray, spacing_rc) -> dict:
    """surface-distance's distances for one slice and label; a side without the other mask gets inf."""
    if truth_2d.any() and prediction_2d.any():
        return surface_distance.compute_surface_distances(truth_2d, prediction_2d, spacing_rc)
    present = truth_2d if truth_2d.any() else prediction_2d
    own = surface_distance.compute_surface_distances(present, present, spacing_rc)  # lengths only
    empty = np.array([])
    if truth_2d.any():
        return {"distances_gt_to_pred": np.full(own["surfel_areas_gt"].size, np.inf), "surfel_areas_gt": own["surfel_areas_gt"],
                "distances_pred_to_gt": empty, "surfel_areas_pred": empty}
    return {"distances_gt_to_pred": empty, "surfel_areas_gt": empty,
            "distances_pred_to_gt": np.full(own["surfel_areas_pred"].size, np.inf), "surfel_areas_pred": own["surfel_areas_pred"]}


def oracle_pooled(parts: list[dict], *, worst: float, tolerance: float) -> tuple[float, float]:
    """HD95 and NSD of several slices' contours pooled, each distance capped at `worst` (the evaluation's policy)."""
    merged = {}
    for side in ("gt_to_pred", "pred_to_gt"):
        areas_key = "surfel_areas_gt" if side == "gt_to_pred" else "surfel_areas_pred"
        distances = np.minimum(np.concatenate([p[f"distances_{side}"] for p in parts]), worst)
        areas = np.concatenate([p[areas_key] for p in parts])
        order = np.lexsort((areas, distances))
        merged[f"distances_{side}"], merged[areas_key] = distances[order], areas[order]
    directed = []
    for distances, areas in ((merged["distances_gt_to_pred"], merged["surfel_areas_gt"]), (merged["distances_pred_to_gt"], merged["surfel_areas_pred"])):
        if distances.size:  # the other side replaced by one perfect point: max(this side, 0) is this side's percentile
            one_sided = {"distances_gt_to_pred": distances, "surfel_areas_gt": areas, "distances_pred_to_gt": np.array([0.0]), "surfel_areas_pred": np.array([1.0])}
            directed.append(surface_distance.compute_robust_hausdorff(one_sided, 95))
    hd = max(directed)
    nsd = surface_distance.compute_surface_dice_at_tolerance(merged, tolerance)
    return float(hd), float(nsd)


# --- contours and distances, slice by slice ---------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_hd95_and_nsd_per_slice_match_surface_distance_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (3, int(rng.integers(12, 40)), int(rng.integers(12, 40)))
    spacing = (float(rng.uniform(0.4, 2.0)), float(rng.uniform(0.4, 2.0)))
    truth, prediction = random_labels(rng, shape, 3), random_labels(rng, shape, 3)
    tolerance = float(rng.uniform(0.5, 3.0))
    pair = match_contours(truth, prediction, spacing_rc_mm=spacing, n_labels=3)
    scores = score_surfaces(pair, group_of_slice=np.arange(3), n_groups=3, n_labels=3, tolerance_mm=tolerance, worst_mm=1e6)
    checked = 0
    for s in range(3):
        for k in (1, 2, 3):
            a, b = truth[s] == k, prediction[s] == k
            if a.any() and b.any():
                d = surface_distance.compute_surface_distances(a, b, spacing)
                assert scores.hd95_mm[s, k - 1] == pytest.approx(surface_distance.compute_robust_hausdorff(d, 95), rel=1e-12)
                assert scores.nsd[s, k - 1] == pytest.approx(surface_distance.compute_surface_dice_at_tolerance(d, tolerance), rel=1e-12)
                checked += 1
    assert checked >= 5


def test_contour_lengths_match_surface_distance_surfel_lengths():
    rng = np.random.default_rng(7)
    mask = random_labels(rng, (1, 30, 25), 1)[0]
    spacing = (0.7, 1.3)
    contours = find_contours(mask[None].astype(np.uint8), spacing)
    own = surface_distance.compute_surface_distances(mask == 1, mask == 1, spacing)
    assert contours.length_mm.sum() == pytest.approx(own["surfel_areas_gt"].sum(), rel=1e-12)
    assert np.sort(contours.length_mm) == pytest.approx(np.sort(own["surfel_areas_gt"]))


def test_square_shifted_by_two_pixels_has_hd95_of_two_pixel_spacings():
    truth = np.zeros((1, 20, 20), np.uint8)
    truth[0, 5:12, 5:12] = 1
    prediction = np.roll(truth, 2, axis=2)  # two columns to the right
    spacing = (0.5, 0.8)
    scores = score_case(truth, prediction, n_labels=1, spacing_rc_mm=spacing, tolerance_mm=1.0, level_of_slice=np.array([-1]), n_levels=0)
    assert scores.per_case.hd95_mm[0, 0] == pytest.approx(1.6)  # 2 x 0.8 mm
    assert scores.per_case.dice[0, 0] == pytest.approx(2 * 35 / 98)  # 7 x 5 overlap of two 7 x 7
    # tolerance exactly at the shift: everything within (distance <= tolerance counts)
    exact = score_case(truth, prediction, n_labels=1, spacing_rc_mm=spacing, tolerance_mm=1.6, level_of_slice=np.array([-1]), n_levels=0)
    assert exact.per_case.nsd[0, 0] == pytest.approx(1.0)


def test_identical_masks_score_perfectly_and_absent_muscles_are_not_scored():
    rng = np.random.default_rng(3)
    truth = random_labels(rng, (4, 24, 24), 3)
    truth[truth == 3] = 0  # label 3 absent from both
    scores = score_case(truth, truth.copy(), n_labels=3, spacing_rc_mm=(1.0, 1.0), tolerance_mm=1.0, level_of_slice=np.full(4, -1), n_levels=0)
    assert scores.per_case.dice[0, :2] == pytest.approx([1.0, 1.0])
    assert scores.per_case.hd95_mm[0, :2] == pytest.approx([0.0, 0.0])
    assert scores.per_case.nsd[0, :2] == pytest.approx([1.0, 1.0])
    assert np.isnan(scores.per_case.dice[0, 2]) and np.isnan(scores.per_case.hd95_mm[0, 2]) and np.isnan(scores.per_case.nsd[0, 2])


def test_muscle_in_one_mask_only_scores_zero_and_worst_distance():
    truth = np.zeros((2, 16, 20), np.uint8)
    truth[0, 4:9, 4:9] = 1
    prediction = np.zeros_like(truth)
    prediction[1, 2:5, 2:5] = 2  # label 2 predicted, absent from the truth
    spacing = (1.5, 0.5)
    scores = score_case(truth, prediction, n_labels=2, spacing_rc_mm=spacing, tolerance_mm=2.0, level_of_slice=np.array([-1, -1]), n_levels=0)
    worst = math.hypot(16 * 1.5, 20 * 0.5)
    assert scores.worst_hd_mm == pytest.approx(worst)
    for k in (0, 1):
        assert scores.per_case.dice[0, k] == 0.0
        assert scores.per_case.nsd[0, k] == 0.0
        assert scores.per_case.hd95_mm[0, k] == pytest.approx(worst)
    assert np.isnan(scores.per_slice.dice[1, 0]) and scores.per_slice.dice[0, 0] == 0.0


# --- whole cases: Dice over annotated voxels, pooled surface metrics --------------------------


@pytest.mark.parametrize("seed", range(4))
def test_case_scores_match_oracles_with_unannotated_voxels(seed):
    rng = np.random.default_rng(100 + seed)
    n_labels, shape = 4, (5, 28, 32)
    spacing = (float(rng.uniform(0.5, 1.5)), float(rng.uniform(0.5, 1.5)))
    truth = random_labels(rng, shape, n_labels)
    prediction = random_labels(rng, shape, n_labels)
    prediction[2] = np.where(rng.random(shape[1:]) < 0.2, 0, truth[2])  # one slice close to the truth
    unannotated = np.zeros(shape, bool)
    unannotated[1, :, :10] = True  # a partly annotated slice
    truth_codes = np.where(unannotated, n_labels + 1, truth).astype(np.uint8)
    tolerance = 1.3
    scores = score_case(truth_codes, prediction, n_labels=n_labels, spacing_rc_mm=spacing, tolerance_mm=tolerance,
                        level_of_slice=np.array([0, 0, 1, -1, 1]), n_levels=2)

    annotated = ~unannotated
    confusion = gc_stats.calculate_confusion_matrix(truth[annotated], prediction[annotated], list(range(n_labels + 1)))
    with np.errstate(invalid="ignore"):
        oracle_dice = gc_stats.dice_from_confusion_matrix(confusion)[1:]
    np.testing.assert_allclose(scores.per_case.dice[0], oracle_dice, rtol=1e-6)

    worst = scores.worst_hd_mm
    truth_in, prediction_in = np.where(unannotated, 0, truth), np.where(unannotated, 0, prediction)
    for k in range(1, n_labels + 1):
        parts = [oracle_surface(truth_in[s] == k, prediction_in[s] == k, spacing) for s in range(shape[0]) if (truth_in[s] == k).any() or (prediction_in[s] == k).any()]
        hd, nsd = oracle_pooled(parts, worst=worst, tolerance=tolerance)
        assert scores.per_case.hd95_mm[0, k - 1] == pytest.approx(hd, rel=1e-12)
        assert scores.per_case.nsd[0, k - 1] == pytest.approx(nsd, rel=1e-12)
        # level 1 pools slices 2 and 4
        level_parts = [oracle_surface(truth_in[s] == k, prediction_in[s] == k, spacing) for s in (2, 4) if (truth_in[s] == k).any() or (prediction_in[s] == k).any()]
        if level_parts:
            hd, nsd = oracle_pooled(level_parts, worst=worst, tolerance=tolerance)
            assert scores.per_level.hd95_mm[1, k - 1] == pytest.approx(hd, rel=1e-12)
            assert scores.per_level.nsd[1, k - 1] == pytest.approx(nsd, rel=1e-12)
    for s in range(shape[0]):
        mask = annotated[s]
        confusion = gc_stats.calculate_confusion_matrix(truth[s][mask], prediction[s][mask], list(range(n_labels + 1)))
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(scores.per_slice.dice[s], gc_stats.dice_from_confusion_matrix(confusion)[1:], rtol=1e-6)
    np.testing.assert_array_equal(scores.per_level.n_slices, [2, 2])
    assert scores.per_slice.truth_area_cm2[0] == pytest.approx(scores.per_slice.truth_px[0] * spacing[0] * spacing[1] / 100)


# --- aggregates and JSON ------------------------------------------------------------------------


def test_describe_matches_numpy_and_skips_unscored_values():
    values = [0.5, 0.9, float("nan"), 0.7, None, 0.8]
    finite = np.array([0.5, 0.9, 0.7, 0.8])
    stats = describe(values)
    assert stats["n"] == 4
    assert stats["mean"] == pytest.approx(finite.mean())
    assert stats["std"] == pytest.approx(finite.std())
    assert stats["median"] == pytest.approx(np.median(finite))
    assert stats["p05"] == pytest.approx(np.percentile(finite, 5))
    assert stats["p95"] == pytest.approx(np.percentile(finite, 95))
    assert describe([float("nan")]) == {"mean": None, "std": None, "median": None, "p05": None, "p95": None, "n": 0}


def test_metrics_json_refuses_nan_and_infinity():
    with pytest.raises(RuntimeError, match="non-finite"):
        render_metrics_json({"a": float("nan")})
    with pytest.raises(RuntimeError, match="non-finite"):
        render_metrics_json({"a": [float("inf")]})
    assert json.loads(render_metrics_json({"a": None})) == {"a": None}


def test_label_set_orders_values_and_names():
    label_set = LabelSet(names=("a", "b"), values=(3, 9), ignore=255, source="test")
    assert label_set.name_of(9) == "b" and label_set.max_value == 9
