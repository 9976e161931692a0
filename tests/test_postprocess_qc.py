"""The QC picture: bounded size for any scan length, muscles drawn in the table's colours, tiles at the levels."""

from __future__ import annotations

import numpy as np
import pytest

from common.labels import LABELS
from postprocess.colours import COLOURS, colour_lookup_table
from postprocess.measures import level_slices, measure_slices
from postprocess.qc import axial_positions, draw_legend, render_qc
from preprocess.geometry import Geometry
from preprocess.vertebrae import LEVEL_ORDER

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _case(n_slices: int, spacing_z: float, size: int = 256):
    labels = np.zeros((n_slices, size, size), np.uint8)
    hu = np.full(labels.shape, -1000, np.int16)
    y, x = np.mgrid[:size, :size]
    body = ((x - size / 2) / (size * 0.4)) ** 2 + ((y - size / 2) / (size * 0.3)) ** 2 <= 1
    hu[:, body] = 40
    labels[:, (np.abs(x - size * 0.35) < 12) & (np.abs(y - size * 0.65) < 10)] = LABELS["erector_spinae_right"]
    labels[:, (np.abs(x - size * 0.65) < 12) & (np.abs(y - size * 0.65) < 10)] = LABELS["erector_spinae_left"]
    geometry = Geometry(size_xyz=(size, size, n_slices), spacing_mm=(1.0, 1.0, spacing_z), origin_mm=(0.0, 0.0, 0.0), direction=LPS)
    return labels, hu, geometry


@pytest.mark.parametrize("n_slices, spacing_z", [(20, 2.0), (300, 1.25), (3, 5.0)])
def test_picture_size_stays_bounded_for_short_and_long_scans(n_slices, spacing_z):
    labels, hu, geometry = _case(n_slices, spacing_z)
    picture = render_qc(labels, hu, measure_slices(labels, hu, geometry), title="t", subtitle="s")
    assert 1000 < picture.width < 2600 and 400 < picture.height < 1400


def test_muscles_are_drawn_in_the_colour_table_and_only_present_ones():
    labels, hu, geometry = _case(12, 3.0)
    pixels = np.asarray(render_qc(labels, hu, measure_slices(labels, hu, geometry), title="t", subtitle="s")).reshape(-1, 3)
    colours = {tuple(int(c) for c in pixels_row) for pixels_row in np.unique(pixels, axis=0)}
    assert COLOURS["erector_spinae_right"] in colours and COLOURS["erector_spinae_left"] in colours  # outlines at full colour
    table = colour_lookup_table()
    assert tuple(table[LABELS["psoas_major_right"]]) == COLOURS["psoas_major_right"]


def test_tiles_are_the_level_mid_slices_when_levels_are_known_else_evenly_spaced():
    labels, hu, geometry = _case(26, 5.0)
    labels[:3] = 0  # the muscles span slices 3..25
    vertebrae = np.zeros_like(labels)
    for k in range(26):
        vertebrae[k, 100:140, 110:146] = LEVEL_ORDER.index(["L2", "L1", "T12"][k * 3 // 26]) + 1
    measures = measure_slices(labels, hu, geometry, vertebrae_zyx=vertebrae)
    positions = axial_positions(measures, measures.frame.view(labels))
    assert [level for _, level in positions] == ["T12", "L1", "L2"]  # cranial first
    assert [k for k, _ in positions] == [mid for _, mid in level_slices(measures).values()]
    even = axial_positions(measure_slices(labels, hu, geometry), labels)
    slices = [k for k, _ in even]
    assert len(slices) == 6 and slices == sorted(slices, reverse=True) and 3 <= min(slices) and max(slices) <= 25
    assert all(caption == "" for _, caption in even)


def _swatch_box(legend: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels of exactly `colour`: the swatch of that label (text is grey)."""
    rows, cols = np.nonzero((legend == np.array(colour)).all(axis=2))
    assert rows.size, f"no pixel of {colour} in the legend"
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_the_legend_crosses_out_and_names_an_absent_muscle_and_only_that_one():
    present = np.ones(len(LABELS) + 1, bool)
    everything = np.asarray(draw_legend(present, sagittal_label="x")).astype(int)
    right, left = LABELS["psoas_major_right"], LABELS["psoas_major_left"]
    top, bottom, x0, x1 = _swatch_box(everything, COLOURS["psoas_major_right"])
    left_top, left_bottom, left_x0, left_x1 = _swatch_box(everything, COLOURS["psoas_major_left"])

    present[right] = False
    one_absent = np.asarray(draw_legend(present, sagittal_label="x")).astype(int)
    changed_rows, changed_cols = np.nonzero((one_absent != everything).any(axis=2))
    assert changed_rows.min() >= top - 2 and changed_rows.max() <= bottom + 2  # only the psoas row changed
    # a black line across the right swatch, from its top-left corner to its bottom-right corner
    for t in np.linspace(0.1, 0.9, 9):
        y, x = int(round(top + t * (bottom - top))), int(round(x0 + t * (x1 - x0)))
        assert (one_absent[y - 1:y + 2, x - 1:x + 2] == 0).all(axis=2).any(), (y, x)
    left_swatch = (slice(left_top, left_bottom + 1), slice(left_x0, left_x1 + 1))
    assert np.array_equal(one_absent[left_swatch], everything[left_swatch])  # the left twin, present, is not crossed out
    assert changed_cols.max() > left_x0 + 60  # and the row's text grew ("absent: right")

    present[left] = False
    both_absent = np.asarray(draw_legend(present, sagittal_label="x")).astype(int)
    text_x = left_x0 + 50
    text_row = both_absent[top:bottom + 1, text_x:]
    assert text_row.max() <= 130 + 1 < everything[top:bottom + 1, text_x:].max()  # dimmed when both sides are absent


def test_the_picture_crosses_out_the_muscles_its_mask_lacks():
    labels, hu, geometry = _case(12, 3.0)  # erector spinae only
    picture = np.asarray(render_qc(labels, hu, measure_slices(labels, hu, geometry), title="t", subtitle="s")).astype(int)
    top, bottom, x0, x1 = _swatch_box(picture, COLOURS["psoas_major_right"])  # drawn only in the legend: psoas is absent
    middle_y, middle_x = (top + bottom) // 2, (x0 + x1) // 2
    assert (picture[middle_y - 1:middle_y + 2, middle_x - 1:middle_x + 2] == 0).all(axis=2).any()
