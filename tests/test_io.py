"""Reading CT files and DICOM series: geometry round trips, HU, and one clear error per bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from preprocess.dicom import read_dicom_series
from common.errors import InputError, OutputError
from preprocess.geometry import Geometry
from preprocess.io import read_ct, write_label_map
from tests.conftest import write_volume

SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-100.5, 20.25, 300.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS


def _ct(seed=0, shape=(6, 24, 20), dtype=np.int16):
    return np.random.default_rng(seed).integers(-1024, 2000, shape).astype(dtype)


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii", ".nrrd"])
def test_file_formats_round_trip_voxels_and_geometry(tmp_path, suffix):
    volume = _ct()
    path = write_volume(volume, tmp_path / f"ct{suffix}", spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    got, geometry = read_ct(path)
    np.testing.assert_array_equal(got, volume)
    assert geometry.size_xyz == (20, 24, 6)
    np.testing.assert_allclose(geometry.spacing_mm, SPACING, rtol=1e-6)
    np.testing.assert_allclose(geometry.origin_mm, ORIGIN, atol=1e-4)
    np.testing.assert_allclose(geometry.direction, DIRECTION, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64, np.uint8])
def test_any_stored_type_becomes_int16_or_float32_hu(tmp_path, dtype):
    volume = (_ct(1) + (1024 if np.issubdtype(dtype, np.unsignedinteger) else 0)).clip(0 if dtype == np.uint8 else None, 255 if dtype == np.uint8 else None).astype(dtype)
    got, _ = read_ct(write_volume(volume, tmp_path / "ct.mha"))
    assert got.dtype in (np.int16, np.float32)
    np.testing.assert_allclose(got, volume.astype(np.float64))


def test_nifti_scaling_is_applied(tmp_path):
    """A NIfTI holding uint16 with scl_slope/scl_inter: HU come out."""
    import struct

    volume = np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8) * 10
    path = write_volume(volume, tmp_path / "ct.nii")
    raw = bytearray(path.read_bytes())
    raw[112:120] = struct.pack("<ff", 1.0, -1024.0)  # scl_slope, scl_inter
    path.write_bytes(bytes(raw))
    got, _ = read_ct(path)
    np.testing.assert_allclose(got, volume.astype(np.float64) - 1024)


def test_truncated_nifti_gz_is_refused_not_misread(tmp_path):
    path = write_volume(_ct(shape=(20, 64, 64)), tmp_path / "ct.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_ct(path)


def test_truncated_mha_is_refused(tmp_path):
    path = write_volume(_ct(shape=(20, 64, 64)), tmp_path / "ct.mha")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="ct.mha"):
        read_ct(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.mha", "no such file"),
        (lambda d: (d / "empty.mha").touch() or d / "empty.mha", "empty"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "unsupported file type"),
        (lambda d: (d / "fake.nii.gz").write_bytes(gzip.compress(b"not an image" * 10)) and d / "fake.nii.gz", "cannot be read"),
        (lambda d: write_volume(np.zeros((16, 16), np.int16), d / "flat.mha"), "3D"),
        (lambda d: write_volume(np.zeros((3, 16, 16, 3), np.uint8), d / "rgb.mha"), "scalar"),
        (lambda d: write_volume(np.full((3, 16, 16), np.nan, np.float32), d / "nan.mha"), "NaN"),
    ],
    ids=["missing", "empty", "wrong-extension", "garbage-gzip", "2d", "rgb", "nan"],
)
def test_bad_files_raise_one_input_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as error:
        read_ct(path)
    assert path.name in str(error.value) or str(path.parent) in str(error.value)
    assert "\n" not in str(error.value)


def test_label_map_is_written_on_the_exact_input_grid(tmp_path):
    geometry = Geometry((20, 24, 6), SPACING, ORIGIN, DIRECTION)
    labels = np.random.default_rng(2).integers(0, 23, (6, 24, 20)).astype(np.uint8)
    write_label_map(labels, geometry, tmp_path / "out" / "mask.mha")
    image = sitk.ReadImage(str(tmp_path / "out" / "mask.mha"))
    assert image.GetPixelID() == sitk.sitkUInt8
    assert Geometry.from_image(image) == geometry
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mask.mha"]  # no temp file left


def test_unwritable_output_is_an_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        write_label_map(np.zeros((1, 8, 8), np.uint8), Geometry((8, 8, 1), (1.0,) * 3, (0.0,) * 3, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), blocker / "x" / "m.mha")


# ---------------------------------------------------------------- DICOM (real JPEG 2000 series)


def test_real_dicom_series_reads_as_hu_with_physical_geometry(ts_example):
    volume, geometry = read_dicom_series(ts_example / "example_ct_dicom")
    assert volume.shape == (20, 512, 512)
    assert volume.min() == -1024 and volume.max() > 1000  # uint16 + intercept -1024 -> HU
    assert geometry.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
    # its TotalSegmentator label map is stored LAS; both must cover the same physical box
    seg = sitk.ReadImage(str(ts_example / "example_seg_dicom.nii.gz"))
    ours = geometry.apply_to(sitk.GetImageFromArray(volume))
    def box(image):
        corners = np.array([image.TransformIndexToPhysicalPoint((x, y, z)) for x in (0, 511) for y in (0, 511) for z in (0, 19)])
        return corners.min(0), corners.max(0)

    for ours_edge, seg_edge in zip(box(ours), box(seg)):
        np.testing.assert_allclose(ours_edge, seg_edge, atol=1e-3)


def test_dicom_pixels_match_simpleitk_series_reader(ts_example):
    """Oracle: GDCM's own series reader on the files in our order."""
    folder = ts_example / "example_ct_dicom"
    volume, _ = read_dicom_series(folder)
    from preprocess.dicom import list_ct_slices, sort_slices

    paths, _ = sort_slices([s.plane for s in list_ct_slices(folder)], folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reader.Execute()), volume)


def _copy_series(src: Path, dst: Path, edit=None, keep=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.iterdir())
    for index, path in enumerate(files):
        if keep is not None and not keep(index):
            continue
        if edit is None:
            shutil.copy(path, dst / path.name)
        else:
            dataset = pydicom.dcmread(path)
            edit(index, dataset)
            dataset.save_as(dst / path.name)
    return dst


def test_dicom_folder_with_two_series_is_refused(ts_example, tmp_path):
    def edit(index, ds):
        ds.SeriesInstanceUID = f"1.2.3.{index % 2}"

    folder = _copy_series(ts_example / "example_ct_dicom", tmp_path / "two", edit)
    with pytest.raises(InputError, match="2 CT series"):
        read_ct(folder)


def test_dicom_series_with_a_missing_slice_is_refused(ts_example, tmp_path):
    folder = _copy_series(ts_example / "example_ct_dicom", tmp_path / "gap", keep=lambda i: i != 7)
    with pytest.raises(InputError, match="missing slices"):
        read_ct(folder)


def test_dicom_series_with_duplicate_positions_is_refused(ts_example, tmp_path):
    folder = _copy_series(ts_example / "example_ct_dicom", tmp_path / "dup", keep=lambda i: i < 5)
    extra = pydicom.dcmread(next(iter(sorted(folder.iterdir()))))
    extra.save_as(folder / "copy.dcm")
    with pytest.raises(InputError, match="same position"):
        read_ct(folder)


def test_non_ct_dicom_is_refused(ts_example, tmp_path):
    def edit(index, ds):
        ds.Modality = "MR"

    folder = _copy_series(ts_example / "example_ct_dicom", tmp_path / "mr", edit, keep=lambda i: i < 3)
    with pytest.raises(InputError, match="no CT image slices.*MR"):
        read_ct(folder)


def test_dicom_slice_order_does_not_depend_on_file_names(ts_example, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    for index, path in enumerate(sorted((ts_example / "example_ct_dicom").iterdir())):
        shutil.copy(path, folder / f"{(index * 7) % 20:03d}.dcm")
    a, ga = read_ct(folder)
    b, gb = read_ct(ts_example / "example_ct_dicom")
    np.testing.assert_array_equal(a, b)
    assert ga == gb


def test_jpeg_ls_series_reads_the_same_hu_as_jpeg_2000(ts_example, tmp_path):
    """Re-encode the real JPEG 2000 series as JPEG-LS lossless (pydicom + pyjpegls); the HU must not change."""
    pytest.importorskip("jpeg_ls", reason="pyjpegls (test dependency) encodes JPEG-LS")
    from pydicom.uid import JPEGLSLossless

    def edit(index, ds):
        ds.compress(JPEGLSLossless, ds.pixel_array)

    folder = _copy_series(ts_example / "example_ct_dicom", tmp_path / "jls", edit)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == JPEGLSLossless
    a, ga = read_ct(folder)
    b, gb = read_ct(ts_example / "example_ct_dicom")
    np.testing.assert_array_equal(a, b)
    assert ga == gb
