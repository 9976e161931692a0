"""Muscle measures on phantoms with known areas, HU and positions; vertebral levels in physical space; the real CT."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import SimpleITK as sitk

from common.labels import LABELS, LEVELS, NUM_CLASSES
from postprocess.measures import (
    FAT_THRESHOLD_HU, AxialFrame, level_slices, measure_slices, per_slice, slice_table_csv, summarise_levels, summarise_muscles,
)
from postprocess.spine import body_centres_mm
from common.errors import InputError
from preprocess.geometry import Geometry
from preprocess.io import read_ct
from preprocess.vertebrae import LEVEL_ORDER, SCHEMES, majority_per_slice, read_vertebrae, vertebrae_on_grid

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
ES_R, ES_L, PSOAS_R = LABELS["erector_spinae_right"], LABELS["erector_spinae_left"], LABELS["psoas_major_right"]


def _ellipse(shape_yx, spacing_xy, centre_mm, radii_mm):
    y, x = np.mgrid[: shape_yx[0], : shape_yx[1]]
    return ((x * spacing_xy[0] - centre_mm[0]) / radii_mm[0]) ** 2 + ((y * spacing_xy[1] - centre_mm[1]) / radii_mm[1]) ** 2 <= 1.0


def _phantom(seed=0, *, spacing=(0.7, 0.9, 2.5), n_slices=12, shape_yx=(300, 340)):
    """LPS phantom: a vertebra (round body + thin spinous process), erector spinae left/right, one psoas; known truth."""
    rng = np.random.default_rng(seed)
    sx, sy, _ = spacing
    body_c = (sx * shape_yx[1] / 2, sy * shape_yx[0] / 2)  # (x, y) mm from voxel (0, 0)
    labels = np.zeros((n_slices, *shape_yx), np.uint8)
    vertebrae = np.zeros_like(labels)
    hu = rng.normal(45.0, 12.0, size=labels.shape).astype(np.float32)
    body = _ellipse(shape_yx, (sx, sy), body_c, (20.0, 16.0))
    y, x = np.mgrid[: shape_yx[0], : shape_yx[1]]
    process = (np.abs(x * sx - body_c[0]) <= 3.0) & (y * sy > body_c[1] + 15) & (y * sy < body_c[1] + 70)  # posterior, 6 mm wide
    es_r = _ellipse(shape_yx, (sx, sy), (body_c[0] - 45, body_c[1] + 55), (22.0, 16.0))
    es_l = _ellipse(shape_yx, (sx, sy), (body_c[0] + 40, body_c[1] + 50), (20.0, 18.0))
    psoas = _ellipse(shape_yx, (sx, sy), (body_c[0] - 38, body_c[1] - 5), (12.0, 14.0))
    for k in range(n_slices):
        vertebrae[k][body | process] = 1
        labels[k][es_r] = ES_R
        labels[k][es_l] = ES_L
        if k >= 4:
            labels[k][psoas] = PSOAS_R
    fat = (rng.random(labels.shape) < 0.1) & (labels == ES_L)  # 10 % of left erector spinae voxels are fat
    hu[fat] = -80.0
    geometry = Geometry(size_xyz=(shape_yx[1], shape_yx[0], n_slices), spacing_mm=spacing, origin_mm=(-100.0, -120.0, 300.0), direction=LPS)
    truth = {"body_centre": body_c, "es_r_area_cm2": np.pi * 22 * 16 / 100, "es_l_area_cm2": np.pi * 20 * 18 / 100, "psoas_area_cm2": np.pi * 12 * 14 / 100,
             "es_r_arm": (-55.0, 45.0), "es_l_arm": (-50.0, 40.0), "psoas_arm": (5.0, 38.0), "fat": fat}
    return labels, hu, vertebrae, geometry, truth


def test_area_and_hu_match_the_phantom_truth_within_tolerance():
    labels, hu, vertebrae, geometry, truth = _phantom()
    m = measure_slices(labels, hu, geometry)
    values = per_slice(m)
    k = 6
    assert values["area_cm2"][k, ES_R] == pytest.approx(truth["es_r_area_cm2"], rel=0.02)
    assert values["area_cm2"][k, ES_L] == pytest.approx(truth["es_l_area_cm2"], rel=0.02)
    assert values["area_cm2"][k, PSOAS_R] == pytest.approx(truth["psoas_area_cm2"], rel=0.02)
    assert values["mean_hu"][k, ES_R] == pytest.approx(45.0, abs=1.0)
    assert values["sd_hu"][k, ES_R] == pytest.approx(12.0, rel=0.05)
    assert values["mean_hu"][k, PSOAS_R] == pytest.approx(45.0, abs=1.0)
    # the fat fraction is exactly the fraction of planted fat voxels (their -80 HU is far below -30, the rest far above)
    es_l_k = labels[k] == ES_L
    assert values["fat_fraction"][k, ES_L] == pytest.approx(truth["fat"][k][es_l_k].mean(), abs=1e-12)
    assert np.isnan(values["mean_hu"][0, PSOAS_R]) and values["area_cm2"][0, PSOAS_R] == 0  # psoas absent below slice 4


def test_slice_sums_agree_with_a_per_label_mask_oracle():
    labels, hu, _, geometry, _ = _phantom(seed=3, n_slices=5)
    labels[2, 10:40, 10:60] = LABELS["trapezius_left"]  # a fourth label, partly overlapping nothing else
    m = measure_slices(labels, hu, geometry)
    values = per_slice(m)
    sx, sy, _ = geometry.spacing_mm
    for k in range(labels.shape[0]):
        for value in np.unique(labels[k])[1:]:
            mask = labels[k] == value
            h = hu[k][mask].astype(np.float64)
            assert m.voxels[k, value] == mask.sum()
            assert values["area_cm2"][k, value] == pytest.approx(mask.sum() * sx * sy / 100)
            assert values["mean_hu"][k, value] == pytest.approx(h.mean(), abs=1e-6)
            assert values["sd_hu"][k, value] == pytest.approx(h.std(), abs=1e-6)
            assert values["fat_fraction"][k, value] == pytest.approx((h < FAT_THRESHOLD_HU).mean())
            ys, xs = np.nonzero(mask)
            assert m.x_sum_mm[k, value] / m.voxels[k, value] == pytest.approx(xs.mean() * sx)
            assert m.y_sum_mm[k, value] / m.voxels[k, value] == pytest.approx(ys.mean() * sy)


def test_dense_label_maps_take_the_all_voxel_sums_and_agree_with_the_oracle_and_the_sparse_sums():
    # a random network's output: nearly every voxel is some muscle; stored in a flipped frame, so the views are strided
    from postprocess.measures import SUM_NAMES, slice_sums_dense, slice_sums_sparse

    rng = np.random.default_rng(11)
    labels = rng.integers(0, NUM_CLASSES, size=(3, 40, 50)).astype(np.uint8)
    hu = rng.normal(0, 60, size=labels.shape).astype(np.int16)
    sparse = slice_sums_sparse(labels[:, ::-1], hu[:, ::-1], n_labels=NUM_CLASSES, pixel_mm=(0.7, 0.9))
    dense = slice_sums_dense(labels[:, ::-1], hu[:, ::-1], n_labels=NUM_CLASSES, pixel_mm=(0.7, 0.9))
    for name in SUM_NAMES:
        np.testing.assert_allclose(dense[name], sparse[name], rtol=1e-12, err_msg=name)
    geometry = Geometry(size_xyz=(50, 40, 3), spacing_mm=(0.7, 0.9, 2.0), origin_mm=(0.0, 0.0, 0.0), direction=LPS)
    m = measure_slices(labels, hu, geometry)  # > 25 % muscle voxels: the dense path
    for k in range(3):
        for value in (1, 9, NUM_CLASSES - 1):
            mask = labels[k] == value
            ys, xs = np.nonzero(mask)
            h = hu[k][mask].astype(np.float64)
            assert m.voxels[k, value] == mask.sum() and m.hu_sum[k, value] == pytest.approx(h.sum())
            assert m.hu_sq_sum[k, value] == pytest.approx((h * h).sum()) and m.fat_voxels[k, value] == (h < FAT_THRESHOLD_HU).sum()
            assert m.x_sum_mm[k, value] == pytest.approx(xs.sum() * 0.7) and m.y_sum_mm[k, value] == pytest.approx(ys.sum() * 0.9)
    assert not m.voxels[:, 0].any() and not m.hu_sum[:, 0].any()  # background is no muscle


def test_body_centre_ignores_the_spinous_process_and_moment_arms_are_signed_by_side():
    labels, hu, vertebrae, geometry, truth = _phantom()
    m = measure_slices(labels, hu, geometry, vertebrae_zyx=vertebrae * (LEVEL_ORDER.index("L3") + 1))
    assert np.allclose(m.body_centre_mm[:, 0], truth["body_centre"][0], atol=0.5)
    assert np.allclose(m.body_centre_mm[:, 1], truth["body_centre"][1], atol=1.0)  # the 55 mm process behind it does not pull it back
    values = per_slice(m)
    k = 6
    for label, (anterior, lateral) in ((ES_R, truth["es_r_arm"]), (ES_L, truth["es_l_arm"]), (PSOAS_R, truth["psoas_arm"])):
        assert values["anterior_mm"][k, label] == pytest.approx(anterior, abs=1.0)
        assert values["lateral_mm"][k, label] == pytest.approx(lateral, abs=1.0)


def test_a_slice_with_only_thin_posterior_elements_gets_no_body_centre():
    vertebrae = np.zeros((2, 120, 120), np.uint8)
    vertebrae[:, 50:110, 58:63] = 5  # a 5-voxel (4 mm) wide process, no body
    vertebrae[1, 10:50, 30:90] = 5  # slice 1 has a body too
    centres = body_centres_mm(vertebrae, np.array([5, 5]), pixel_spacing_mm=(0.8, 0.8))
    assert np.isnan(centres[0]).all()
    assert centres[1] == pytest.approx([(30 + 89) / 2 * 0.8, (10 + 49) / 2 * 0.8], abs=0.8)


def test_measures_are_the_same_for_any_voxel_order():
    labels, hu, vertebrae, geometry, _ = _phantom(seed=1, n_slices=8)
    vertebrae = vertebrae * (LEVEL_ORDER.index("L2") + 1)
    reference = measure_slices(labels, hu, geometry, vertebrae_zyx=vertebrae)
    for frame in ("RAS", "PIR", "LAI"):
        image = geometry.apply_to(sitk.GetImageFromArray(labels))
        oriented = sitk.DICOMOrient(image, frame)
        g = Geometry.from_image(oriented)

        def stored(array):
            return sitk.GetArrayFromImage(sitk.DICOMOrient(geometry.apply_to(sitk.GetImageFromArray(array)), frame))

        m = measure_slices(stored(labels), stored(hu), g, vertebrae_zyx=stored(vertebrae))
        assert np.array_equal(m.voxels, reference.voxels)
        assert np.allclose(m.frame.z_mm, reference.frame.z_mm)
        for key, value in per_slice(m).items():
            assert np.allclose(value, per_slice(reference)[key], equal_nan=True, atol=1e-6), (frame, key)
        # the reported slice index is the input's own axial index: slice k of the LPS frame is where the input has it
        axial_axis = [i for i, c in enumerate(g.orientation_code()) if c in "SI"][0]
        numpy_axis = 2 - axial_axis
        for k in (0, 5):
            assert (np.take(stored(labels), m.frame.input_slice[k], axis=numpy_axis) > 0).sum() == (labels[k] > 0).sum()


def test_axial_frame_z_is_the_physical_superior_coordinate():
    geometry = Geometry(size_xyz=(4, 4, 5), spacing_mm=(1.0, 1.0, 2.0), origin_mm=(0.0, 0.0, 50.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    frame = AxialFrame.of(geometry)  # feet-first: input slice 0 is the most superior
    assert frame.input_slice.tolist() == [4, 3, 2, 1, 0]
    assert frame.z_mm.tolist() == [42.0, 44.0, 46.0, 48.0, 50.0]


def _vertebra_image(levels_of_slices, spacing, origin, shape_yx=(40, 40), scheme="totalsegmentator"):
    """A vertebra map on its own grid: slab k holds the vertebra named levels_of_slices[k] (values of `scheme`)."""
    value_of = {name: value for value, name in SCHEMES[scheme].items()}
    array = np.zeros((len(levels_of_slices), *shape_yx), np.int16)
    for k, name in enumerate(levels_of_slices):
        if name:
            array[k, 10:30, 12:28] = value_of[name]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_levels_come_from_the_vertebra_map_in_physical_space_not_by_index():
    # CT: 30 slices of 2 mm from z=0; vertebra map: 6 mm slabs from z=-3 on a coarser, shifted grid
    geometry = Geometry(size_xyz=(50, 50, 30), spacing_mm=(1.0, 1.0, 2.0), origin_mm=(-5.0, -5.0, 0.0), direction=LPS)
    names = ["L3", "L3", "L2", "L2", "L1", "L1", "T12", "T12", "T12", "T12", "T12"]
    image = _vertebra_image(names, spacing=(1.5, 1.5, 6.0), origin=(-8.0, -2.0, -3.0))
    levels_zyx = vertebrae_on_grid(image, geometry, scheme="totalsegmentator", source="test")
    per_slice_level = majority_per_slice(levels_zyx, len(LEVEL_ORDER))
    z = np.arange(30) * 2.0
    slab = np.clip(np.floor((z + 3.0 + 3.0) / 6.0).astype(int), 0, len(names) - 1)  # nearest slab centre (-3 + 6 j)
    expected = [LEVEL_ORDER.index(names[j]) + 1 for j in slab]
    assert per_slice_level.tolist() == expected
    labels = np.zeros(geometry.shape_zyx, np.uint8)
    labels[:, 20:30, 20:30] = ES_R
    m = measure_slices(labels, np.zeros(labels.shape, np.int16), geometry, vertebrae_zyx=levels_zyx)
    found = level_slices(m)
    assert list(found) == ["T12", "L1", "L2", "L3"]  # cranial first
    for name, (slices, mid) in found.items():
        assert slices.tolist() == [k for k in range(30) if expected[k] == LEVEL_ORDER.index(name) + 1]
        assert abs(z[mid] - z[slices].mean()) <= 1.0


def test_the_levels_scheme_refuses_values_it_does_not_name_and_an_empty_overlap_is_an_error():
    geometry = Geometry(size_xyz=(20, 20, 5), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0), direction=LPS)
    array = np.zeros((5, 20, 20), np.int16)
    array[:, 5:10, 5:10] = 14
    with pytest.raises(InputError, match="not vertebrae in the 'levels' scheme"):
        vertebrae_on_grid(sitk.GetImageFromArray(array), geometry, scheme="levels", source="v.nii.gz")
    far = _vertebra_image(["L1"] * 3, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 500.0))
    with pytest.raises(InputError, match="no vertebra"):
        vertebrae_on_grid(far, geometry, scheme="totalsegmentator", source="v.nii.gz")
    organs = _vertebra_image([""] * 5, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="no vertebra"):
        vertebrae_on_grid(organs, geometry, scheme="totalsegmentator", source="v.nii.gz")


def test_level_summaries_pool_the_level_and_report_the_mid_slice():
    labels, hu, vertebrae, geometry, truth = _phantom(n_slices=12)
    level_per_slice = np.array([LEVEL_ORDER.index(n) + 1 for n in ["L2"] * 6 + ["L1"] * 6])
    m = measure_slices(labels, hu, geometry, vertebrae_zyx=vertebrae * level_per_slice[:, None, None])
    levels = summarise_levels(m)
    assert list(levels) == ["L1", "L2"]
    assert levels["L2"]["slices"] == [0, 5] and levels["L1"]["slices"] == [6, 11]
    assert levels["L2"]["mid_slice"] in (2, 3) and levels["L1"]["mid_slice"] in (8, 9)
    psoas = levels["L2"]["muscles"]["psoas_major_right"]
    assert psoas["level_mean"]["area_cm2"] == pytest.approx(truth["psoas_area_cm2"] * 2 / 6, rel=0.02)  # present on 2 of 6 slices
    assert psoas["level_mean"]["mean_hu"] == pytest.approx(45.0, abs=1.0)
    assert levels["L1"]["muscles"]["erector_spinae_left"]["mid_slice"]["lateral_mm"] == pytest.approx(40.0, abs=1.0)
    assert set(levels["L1"]["muscles"]) == {"erector_spinae_right", "erector_spinae_left", "psoas_major_right"}


def test_muscle_summary_volume_and_extent():
    labels, hu, _, geometry, _ = _phantom(n_slices=12)
    summary = summarise_muscles(measure_slices(labels, hu, geometry), geometry)
    voxel_cm3 = np.prod(geometry.spacing_mm) / 1000
    assert summary["psoas_major_right"]["volume_cm3"] == pytest.approx((labels == PSOAS_R).sum() * voxel_cm3, abs=1e-3)
    extent = summary["psoas_major_right"]["extent"]
    assert (extent["inferior_slice"], extent["superior_slice"]) == (4, 11)
    assert extent["inferior_z_mm"] == pytest.approx(300 + 4 * 2.5) and extent["superior_z_mm"] == pytest.approx(300 + 11 * 2.5)
    assert extent["length_mm"] == pytest.approx(8 * 2.5)
    assert summary["trapezius_left"]["extent"] is None and summary["trapezius_left"]["mean_hu"] is None


def test_csv_has_one_row_per_slice_and_present_muscle():
    labels, hu, _, geometry, _ = _phantom(n_slices=6)
    m = measure_slices(labels, hu, geometry)
    rows = list(csv.DictReader(io.StringIO(slice_table_csv(m))))
    assert len(rows) == int((m.voxels[:, 1:] > 0).sum())
    assert rows[0]["slice_index"] == "5"  # superior first
    row = next(r for r in rows if r["slice_index"] == "5" and r["muscle"] == "psoas_major_right")
    assert float(row["area_cm2"]) == pytest.approx(per_slice(m)["area_cm2"][5, PSOAS_R], abs=1e-3)
    assert row["level"] == "" and row["centroid_anterior_mm"] == ""  # no vertebra map: no level, no moment arm


def test_a_label_beyond_the_muscles_is_refused():
    labels, hu, _, geometry, _ = _phantom(n_slices=2)
    labels[0, 0, 0] = NUM_CLASSES
    with pytest.raises(ValueError, match="beyond"):
        measure_slices(labels, hu, geometry)


def test_real_ct_levels_from_totalsegmentator_vertebrae(ts_example):
    """example_ct with TotalSegmentator's own masks as muscles (autochthon = erector spinae, iliopsoas = psoas)."""
    hu, geometry = read_ct(ts_example / "example_ct.nii.gz")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ts_example / "example_seg_fast_force_split.nii.gz")))
    labels = np.zeros(seg.shape, np.uint8)
    for ts_value, name in {87: "erector_spinae_right", 86: "erector_spinae_left", 89: "psoas_major_right", 88: "psoas_major_left"}.items():
        labels[seg == ts_value] = LABELS[name]
    vertebrae = read_vertebrae(ts_example / "example_seg_fast_force_split.nii.gz", geometry, scheme="totalsegmentator")
    m = measure_slices(labels, hu, geometry, vertebrae_zyx=vertebrae)
    levels = summarise_levels(m)
    assert list(levels) == ["T12", "L1", "L2", "L3", "L4"]  # labels 27..33 = L5..T11; T11 owns no slice, L5 is below L4
    for name in ("L1", "L2", "L3", "L4"):
        assert levels[name]["body_centre_found"]
    # the body centre lies in front of the spinal cord (TotalSegmentator label 79), by a vertebral body's depth
    cord = m.frame.view(seg == 79)
    mid = level_slices(m)["L3"][1]
    cord_y = np.nonzero(cord[mid])[0].mean() * m.frame.spacing_mm[1]
    assert 10.0 < cord_y - m.body_centre_mm[mid, 1] < 40.0
    l3 = levels["L3"]["muscles"]
    for side in ("right", "left"):
        es, psoas = l3[f"erector_spinae_{side}"]["mid_slice"], l3[f"psoas_major_{side}"]["mid_slice"]
        assert 15 < es["area_cm2"] < 35 and 4 < psoas["area_cm2"] < 15  # adult L3 ranges
        assert -80 < es["anterior_mm"] < -40 and 25 < es["lateral_mm"] < 55  # behind the body, beside the spinous process
        assert -25 < psoas["anterior_mm"] < 15 and 25 < psoas["lateral_mm"] < 60  # beside the body
        assert -20 < es["mean_hu"] < 80 and 0 <= es["fat_fraction"] < 0.3
    assert levels["L3"]["slices"][0] <= levels["L3"]["mid_slice"] <= levels["L3"]["slices"][1]
    assert LEVELS.index("L3") > LEVELS.index("T12")


def test_real_las_vertebra_map_is_matched_to_the_lps_dicom_in_physical_space(ts_example):
    """example_seg_dicom.nii.gz is stored LAS, the DICOM LPS: the match must flip y, never pair arrays by index."""
    _, geometry = read_ct(ts_example / "example_ct_dicom")
    image = sitk.ReadImage(str(ts_example / "example_seg_dicom.nii.gz"))
    assert np.allclose(image.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1)) and geometry.orientation_code() == "LPS"
    levels_zyx = read_vertebrae(ts_example / "example_seg_dicom.nii.gz", geometry, scheme="totalsegmentator")
    # oracle: the same grid up to the y flip, so the map is the array flipped along y, through the scheme's table
    raw = sitk.GetArrayFromImage(image)[:, ::-1, :]
    lookup = np.zeros(256, np.uint8)
    for value, name in SCHEMES["totalsegmentator"].items():
        lookup[value] = LEVEL_ORDER.index(name) + 1
    assert np.array_equal(levels_zyx, lookup[raw])
    per_slice_level = [LEVEL_ORDER[v - 1] for v in majority_per_slice(levels_zyx, len(LEVEL_ORDER))]
    assert set(per_slice_level) == {"T11", "T12"} and per_slice_level[0] == "T12" and per_slice_level[-1] == "T11"  # T12 inferior
