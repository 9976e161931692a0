"""The synthetic trunk phantom: seeded, muscles at the right levels, sparse labels only on mid-level slices."""

from __future__ import annotations

import numpy as np
import pytest

from common.labels import IGNORE, LABELS, LEVELS
from model.phantom import HU, MUSCLE_LEVELS, make_annotated_slices, make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(11, size_xy=(160, 128), spacing_mm=(2.5, 2.5, 4.0))


def test_same_seed_same_phantom():
    a = make_phantom(5, size_xy=(64, 64), spacing_mm=(6.0, 6.0, 10.0))
    b = make_phantom(5, size_xy=(64, 64), spacing_mm=(6.0, 6.0, 10.0))
    np.testing.assert_array_equal(a.ct_zyx, b.ct_zyx)
    np.testing.assert_array_equal(a.labels_zyx, b.labels_zyx)


def test_geometry_matches_arrays(phantom):
    assert phantom.geometry.shape_zyx == phantom.ct_zyx.shape == phantom.labels_zyx.shape
    assert phantom.geometry.spacing_mm == (2.5, 2.5, 4.0)
    assert phantom.geometry.orientation_code() == "LPS"


def test_each_muscle_appears_exactly_at_its_levels(phantom):
    for level_index, slice_index in enumerate(phantom.mid_slices):
        present = set(np.unique(phantom.labels_zyx[slice_index]).tolist()) - {0}
        for muscle, (first, last) in MUSCLE_LEVELS.items():
            expected = LEVELS.index(first) <= level_index <= LEVELS.index(last)
            for side in ("right", "left"):
                assert (LABELS[f"{muscle}_{side}"] in present) == expected, (muscle, side, LEVELS[level_index])


def test_right_muscles_lie_on_the_patients_right(phantom):
    """LPS: x grows towards the patient's left, so right-side muscles have the smaller x."""
    x = np.arange(phantom.labels_zyx.shape[2])
    for name, value in LABELS.items():
        if name.endswith("_right"):
            mask_r = phantom.labels_zyx == value
            mask_l = phantom.labels_zyx == LABELS[name.replace("_right", "_left")]
            assert x[np.nonzero(mask_r)[2]].mean() < x[np.nonzero(mask_l)[2]].mean(), name


def test_sparse_labels_annotate_only_the_mid_level_slices(phantom):
    sparse = phantom.sparse_labels_zyx
    annotated = np.nonzero((sparse != IGNORE).any(axis=(1, 2)))[0]
    np.testing.assert_array_equal(annotated, np.sort(phantom.mid_slices))
    assert len(annotated) == len(LEVELS) == 13
    np.testing.assert_array_equal(sparse[annotated], phantom.labels_zyx[annotated])
    assert phantom.level_of_slice[phantom.mid_slices].tolist() == list(range(13))


def test_intensities_are_ct_like(phantom):
    ct, labels = phantom.ct_zyx, phantom.labels_zyx
    interior = labels > 0
    assert -1024 <= ct.min() and ct.max() <= 3071
    assert abs(np.median(ct[interior]) - HU["muscle"]) < 25
    assert np.median(ct[:, 0, :]) < -900  # air outside the body


def test_annotated_slices_are_the_phantoms_mid_slices():
    ct, labels = make_annotated_slices(3, size_xy=(96, 96), pixel_spacing_mm=4.0)
    assert ct.shape == labels.shape == (13, 96, 96)
    assert labels.max() <= 22 and (labels > 0).any(axis=(1, 2)).all()


def test_large_phantom_fits_the_issue_limits():
    p = make_phantom(2, size_xy=(512, 512), spacing_mm=(0.8, 0.8, 5.0))
    assert p.ct_zyx.shape[1:] == (512, 512) and p.ct_zyx.dtype == np.int16
