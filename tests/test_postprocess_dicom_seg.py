"""DICOM-SEG on the real DICOM sample (empty Study/Series/SOP UIDs): coded segments, colours, references, exact round trip."""

from __future__ import annotations

import copy
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from common.labels import LABELS
from postprocess.colours import COLOURS
from postprocess.dicom_seg import CONCEPTS, build_segmentation, dicom_seg_bytes, read_source_series
from preprocess.io import read_ct


@pytest.fixture(scope="module")
def series(ts_example):
    return ts_example / "example_ct_dicom"


@pytest.fixture(scope="module")
def label_map(series):
    """Every muscle label somewhere (a block per label on its own slices), on the series' grid."""
    _, geometry = read_ct(series)
    labels = np.zeros(geometry.shape_zyx, np.uint8)
    rng = np.random.default_rng(6)
    for value in LABELS.values():
        k0 = int(rng.integers(0, geometry.shape_zyx[0] - 4))
        y0, x0 = (int(v) for v in rng.integers(20, 440, size=2))
        labels[k0 : k0 + 4, y0 : y0 + 40, x0 : x0 + 30] = value
    labels[:, 300:302, 100:400] = LABELS["erector_spinae_left"]  # thin structure on every slice
    return labels


def _roundtrip(data: bytes, source_uids: list[str]) -> np.ndarray:
    seg = hd.seg.segread(io.BytesIO(data))
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, combine_segments=True, skip_overlap_checks=True)


@pytest.mark.parametrize("kind", ["labelmap", "binary"])
def test_seg_reads_back_voxel_for_voxel(series, label_map, kind):
    source = read_source_series(series)
    data = dicom_seg_bytes(build_segmentation(label_map, source, model_identity="test@1", software_version="1.0.0", segmentation_type=kind))
    back = _roundtrip(data, [str(h.SOPInstanceUID) for h in source.headers])
    assert back.shape == label_map.shape
    assert np.array_equal(back, label_map)
    dataset = pydicom.dcmread(io.BytesIO(data))
    assert dataset.Modality == "SEG" and dataset.SegmentationType == kind.upper()
    # frames lie where their source slices lie
    positions = {tuple(round(float(v), 3) for v in h.ImagePositionPatient) for h in source.headers}
    frame_positions = {tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient) for f in dataset.PerFrameFunctionalGroupsSequence}
    assert frame_positions <= positions


def test_segments_carry_names_codes_laterality_and_the_colour_table(series, label_map):
    source = read_source_series(series)
    dataset = pydicom.dcmread(io.BytesIO(dicom_seg_bytes(build_segmentation(label_map, source, model_identity="m", software_version="1", segmentation_type="binary"))))
    segments = {int(s.SegmentNumber): s for s in dataset.SegmentSequence}
    assert sorted(segments) == sorted(LABELS.values())
    for name, value in LABELS.items():
        segment = segments[value]
        muscle, side = name.rsplit("_", 1)
        assert segment.SegmentLabel == name
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("123037004", "SCT")
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert kind.CodeValue == CONCEPTS[muscle].code.value and kind.CodingSchemeDesignator == "SCT"
        modifier = kind.SegmentedPropertyTypeModifierCodeSequence[0]
        assert modifier.CodeValue == {"right": "24028007", "left": "7771000"}[side]
        shown = hd.color.CIELabColor.from_dicom_value([int(v) for v in segment.RecommendedDisplayCIELabValue]).to_rgb()
        assert np.allclose(shown, COLOURS[name], atol=1.5), name


def test_exact_codes_are_the_dicom_standards_and_approximations_are_flagged():
    # an independent oracle: pydicom's copy of DICOM PS3.16
    standard = {
        "pectoralis_major": codes.SCT.PectoralisMajorMuscle, "serratus_anterior": codes.SCT.SerratusAnteriorMuscle,
        "latissimus_dorsi": codes.SCT.LatissimusDorsiMuscle, "trapezius": codes.SCT.TrapeziusMuscle, "erector_spinae": codes.SCT.ErectorSpinaeMuscle,
    }
    for muscle, concept in CONCEPTS.items():
        if muscle in standard:
            assert not concept.approximate and concept.code.value == standard[muscle].value, muscle
        else:
            assert concept.approximate, muscle
    assert CONCEPTS["rectus_abdominis"].code.value == codes.SCT.AbdominalWallMuscle.value


def test_empty_source_uids_are_completed_from_file_meta_and_derived_reproducibly(series, label_map):
    raw = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    assert all(not r.SOPInstanceUID and not r.StudyInstanceUID and not r.SeriesInstanceUID for r in raw)  # the sample's premise
    first, second = read_source_series(series), read_source_series(series)
    assert first.derived_uids == ("SeriesInstanceUID", "StudyInstanceUID")
    meta_uids = {str(r.file_meta.MediaStorageSOPInstanceUID) for r in raw}
    assert {str(h.SOPInstanceUID) for h in first.headers} == meta_uids  # the objects' own identities, from their file meta
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(getattr(h, attribute)) for h in first.headers}
        assert len(values) == 1 and pydicom.uid.UID(values.pop()).is_valid
        assert getattr(first.headers[0], attribute) == getattr(second.headers[0], attribute)  # same files, same UIDs
    dataset = pydicom.dcmread(io.BytesIO(dicom_seg_bytes(build_segmentation(label_map, first, model_identity="m", software_version="1"))))
    assert dataset.StudyInstanceUID == first.headers[0].StudyInstanceUID
    assert dataset.FrameOfReferenceUID == first.headers[0].FrameOfReferenceUID
    referenced = dataset.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.headers[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == meta_uids
    assert "derived UIDs" in dataset.ContentDescription
    assert dataset.SeriesInstanceUID != referenced.SeriesInstanceUID and pydicom.uid.UID(dataset.SOPInstanceUID).is_valid


def test_a_label_map_off_the_series_grid_is_refused(series):
    source = read_source_series(series)
    with pytest.raises(ValueError, match="does not match the series"):
        build_segmentation(np.zeros((3, 512, 512), np.uint8), source, model_identity="m", software_version="1")


@pytest.mark.parametrize("kind", ["labelmap", "binary"])
def test_pydicom_alone_decodes_the_same_label_map(series, label_map, kind):
    """An oracle independent of highdicom's reader: pydicom's pixel_array, frames placed by position and segment."""
    source = read_source_series(series)
    dataset = pydicom.dcmread(io.BytesIO(dicom_seg_bytes(build_segmentation(label_map, source, model_identity="m", software_version="1",
                                                                            segmentation_type=kind))))
    frames = dataset.pixel_array.reshape(int(dataset.NumberOfFrames), int(dataset.Rows), int(dataset.Columns))
    slice_of = {tuple(round(float(v), 3) for v in h.ImagePositionPatient): k for k, h in enumerate(source.headers)}
    decoded = np.zeros_like(label_map)
    for frame, groups in zip(frames, dataset.PerFrameFunctionalGroupsSequence):
        k = slice_of[tuple(round(float(v), 3) for v in groups.PlanePositionSequence[0].ImagePositionPatient)]
        if kind == "labelmap":
            decoded[k] = frame
        else:
            decoded[k][frame > 0] = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    assert np.array_equal(decoded, label_map)


def test_headers_highdicom_refuses_give_one_input_error_naming_the_series(series, label_map):
    from common.errors import InputError

    source = read_source_series(series)
    broken = [copy.deepcopy(h) for h in source.headers]
    del broken[0].ImageOrientationPatient
    with pytest.raises(InputError, match="--no-dicom-seg"):
        build_segmentation(label_map, type(source)(headers=broken, derived_uids=source.derived_uids, folder=series), model_identity="m",
                           software_version="1")
