"""DICOM-SEG of the muscle label map (highdicom), referencing the source CT series it was derived from.

One segment per muscle: segment number = label value (1..22, all described even when absent, so that the
numbers never shift), label = the canonical name, category "Anatomical Structure" (SCT 123037004), type
the muscle's SNOMED CT concept with a laterality modifier (SCT 24028007 Right / 7771000 Left), algorithm
type AUTOMATIC with the model's identity, and the display colour of postprocess/colours.py (as CIELab).

Codes. Exact: pectoralis major, serratus anterior, latissimus dorsi, trapezius and erector spinae are in
DICOM PS3.16 (CID 6116 / 7151). The standard has no concept for the others, so they carry the nearest
broader concept, flagged `approximate` here and in docs/outputs.md; the segment label names the muscle exactly:
rectus abdominis, external and internal oblique, quadratus lumborum -> "Abdominal wall muscle"
(SCT 1142228004, CID 7154); psoas major -> "Iliopsoas muscle" (SCT 68455001); transversospinalis ->
"Deep muscle of back" (SCT 244849004), both as TotalSegmentator codes its iliopsoas and autochthon.

Source references when the series' UIDs are empty (the real sample has empty Study, Series and SOP
Instance UIDs; a SEG must reference something valid): the SOP Class and SOP Instance UID of a slice fall
back to the Media Storage SOP Class/Instance UID of its own file meta, the same object's identity as
written in its file; whatever is still empty (Study and Series Instance UID, Frame of Reference UID, a
SOP Instance UID without file meta) is *derived*: pydicom's generate_uid with entropy sources (its UID root
and a SHA-512 hash) of the attribute name and the series' sorted slice identities (SOP Instance UIDs, else SHA-256
of each file). The same files always give the same UIDs, so every SEG made from one series references
one study and series; the SEG's ContentDescription and results.json say which UIDs were derived. To
make a viewer link them, stamp those UIDs into the source copy (they are reproducible from the files).

BINARY (the default: Segmentation Storage, which every SEG viewer reads; one uncompressed 1-bit frame per muscle
and slice, empty ones omitted: 14.6 MB for the 20-slice sample, some 0.7 MB per slice with all 22 muscles) or
LABELMAP (--dicom-seg-type labelmap; Supplement 243 Label Map Segmentation, DICOM 2024, its own SOP Class; one frame
per slice, JPEG-LS lossless: 45 kB for the same 20 slices; read by few viewers yet: docs/inputs.md "DICOM-SEG").
"""

from __future__ import annotations

import copy
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from common.labels import LABELS
from postprocess.colours import COLOURS
from preprocess.dicom import DicomSeries, list_ct_slices, sort_slices
from common.errors import InputError

#: Type 2 attributes of the Patient, General Study and General Equipment modules that highdicom copies from the
#: source into the SEG: absent ones are added empty (what Type 2 allows) on the headers' copies, never the files
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
LATERALITY = {"right": Code("24028007", "SCT", "Right"), "left": Code("7771000", "SCT", "Left")}


@dataclass(frozen=True)
class MuscleConcept:
    code: Code
    approximate: bool
    source: str


_ABDOMINAL_WALL = Code("1142228004", "SCT", "Abdominal wall muscle")
#: muscle (without side) -> its segmented property type
CONCEPTS = {
    "pectoralis_major": MuscleConcept(Code("60005003", "SCT", "Pectoralis major muscle"), False, "DICOM CID 6116/7151"),
    "rectus_abdominis": MuscleConcept(_ABDOMINAL_WALL, True, "DICOM CID 7154 (no rectus abdominis concept in DICOM)"),
    "serratus_anterior": MuscleConcept(Code("18346003", "SCT", "Serratus anterior muscle"), False, "DICOM CID 6116/7151"),
    "latissimus_dorsi": MuscleConcept(Code("15665001", "SCT", "Latissimus dorsi muscle"), False, "DICOM CID 6116/7151"),
    "trapezius": MuscleConcept(Code("31764008", "SCT", "Trapezius muscle"), False, "DICOM CID 6116/7151"),
    "external_oblique": MuscleConcept(_ABDOMINAL_WALL, True, "DICOM CID 7154 (no oblique muscle concept in DICOM)"),
    "internal_oblique": MuscleConcept(_ABDOMINAL_WALL, True, "DICOM CID 7154 (no oblique muscle concept in DICOM)"),
    "erector_spinae": MuscleConcept(Code("44947003", "SCT", "Erector spinae muscle"), False, "DICOM CID 6116/7151"),
    "transversospinalis": MuscleConcept(Code("244849004", "SCT", "Deep muscle of back"), True, "TotalSegmentator's code for the autochthonous muscles"),
    "psoas_major": MuscleConcept(Code("68455001", "SCT", "Iliopsoas muscle"), True, "TotalSegmentator's code for iliopsoas"),
    "quadratus_lumborum": MuscleConcept(_ABDOMINAL_WALL, True, "DICOM CID 7154 (posterior abdominal wall; no own concept in DICOM)"),
}
SEGMENTATION_TYPES = ("binary", "labelmap")


def _valid_uid(value) -> bool:
    text = str(value or "").strip()
    return bool(text) and pydicom.uid.UID(text).is_valid


def segment_descriptions(*, model_identity: str, software_version: str) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="trunkseg", family=codes.cid7162.ArtificialIntelligence,
        version=f"{software_version} model {model_identity}"[:64],
    )
    descriptions = []
    for name, value in LABELS.items():
        muscle, side = name.rsplit("_", 1)
        concept = CONCEPTS[muscle]
        description = hd.seg.SegmentDescription(
            segment_number=value, segment_label=name, segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=concept.code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*COLOURS[name]),
        )
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(LATERALITY[side])]
        descriptions.append(description)
    return descriptions


@dataclass(frozen=True)
class SourceSeries:
    headers: list  # pydicom datasets (no pixels), sorted along the slice normal like the CT volume, UIDs completed
    derived_uids: tuple[str, ...]  # attribute names whose values were derived (see the module docstring)
    folder: Path | None = None  # where the series was read from (for messages)


def read_source_series(source: Path | DicomSeries) -> SourceSeries:
    """The CT series' headers in volume order, with missing UIDs completed as the module docstring says.

    `source`: a series folder, or the series a study chose (preprocess/study.py).
    """
    folder = source.folder if isinstance(source, DicomSeries) else Path(source)
    slices = list_ct_slices(source)
    paths, _ = sort_slices([s.plane for s in slices], folder)
    by_path = {s.path: s.header for s in slices}
    headers = [copy.deepcopy(by_path[p]) for p in paths]
    derived: set[str] = set()
    identities = []
    for path, header in zip(paths, headers):
        meta = getattr(header, "file_meta", None)
        for attribute, fallback in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not _valid_uid(header.get(attribute)):
                if meta is not None and _valid_uid(meta.get(fallback)):
                    setattr(header, attribute, str(meta.get(fallback)))
                elif attribute == "SOPClassUID":
                    header.SOPClassUID = pydicom.uid.CTImageStorage
                    derived.add(attribute)
        if not _valid_uid(header.get("SOPInstanceUID")):
            header.SOPInstanceUID = generate_uid(entropy_srcs=["SOPInstanceUID", hashlib.sha256(Path(path).read_bytes()).hexdigest()])
            derived.add("SOPInstanceUID")
        identities.append(str(header.SOPInstanceUID))
    if len(set(identities)) != len(identities):
        raise InputError(f"{folder}: two slices share the SOP Instance UID {next(u for u in identities if identities.count(u) > 1)}")
    series_key = sorted(identities)
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(h.get(attribute) or "").strip() for h in headers}
        if len(values) == 1 and _valid_uid(next(iter(values))):
            continue
        if len(values - {""}) > 1:
            raise InputError(f"{folder}: slices disagree on {attribute} ({', '.join(sorted(values - {''}))[:120]})")
        uid = generate_uid(entropy_srcs=[attribute, *series_key])
        for header in headers:
            setattr(header, attribute, uid)
        derived.add(attribute)
    for header in headers:  # Type 2 (may be empty, must be present) in the modules a SEG copies; exports often drop them
        for attribute in TYPE_2_COPIED:
            if attribute not in header:
                setattr(header, attribute, "")
    return SourceSeries(headers=headers, derived_uids=tuple(sorted(derived)), folder=folder)


def build_segmentation(labels_zyx: np.ndarray, source: SourceSeries, *, model_identity: str, software_version: str,
                       segmentation_type: str = "binary") -> hd.seg.Segmentation:
    """The SEG object of a label map on the source series' grid (slice k of `labels_zyx` is source.headers[k])."""
    if segmentation_type not in SEGMENTATION_TYPES:
        raise ValueError(f"segmentation type {segmentation_type!r} is not one of {SEGMENTATION_TYPES}")
    headers = source.headers
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    if labels_zyx.shape != (len(headers), rows, columns):
        raise ValueError(f"label map {labels_zyx.shape} does not match the series ({len(headers)} slices of {rows}x{columns})")
    description = "Trunk muscles (trunkseg)"
    if source.derived_uids:
        description += "; derived UIDs: " + ",".join(a.replace("InstanceUID", "").replace("UID", "") for a in source.derived_uids)
    labelmap = segmentation_type == "labelmap"
    try:
        return _segmentation(labels_zyx, headers, labelmap=labelmap, description=description, model_identity=model_identity,
                             software_version=software_version)
    except (ValueError, TypeError, AttributeError, KeyError) as error:  # highdicom's checks of the source headers
        where = source.folder or "the DICOM series"
        raise InputError(f"{where}: its headers do not allow a DICOM-SEG that references it ({' '.join(str(error).split())[:200]}); "
                         f"--no-dicom-seg skips it") from None


def _segmentation(labels_zyx: np.ndarray, headers: list, *, labelmap: bool, description: str, model_identity: str,
                  software_version: str) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=np.ascontiguousarray(labels_zyx, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(model_identity=model_identity, software_version=software_version),
        series_instance_uid=generate_uid(),
        series_number=9000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="trunkseg",
        manufacturer_model_name="trunkseg 2D nnU-Net trunk muscles",
        software_versions=software_version,
        device_serial_number="none",
        series_description="Trunk muscle segmentation",
        content_description=description[:64],
        content_label="MUSCLES",
        transfer_syntax_uid=JPEGLSLossless if labelmap else ExplicitVRLittleEndian,
        omit_empty_frames=not labelmap,
    )


def dicom_seg_bytes(segmentation: hd.seg.Segmentation) -> bytes:
    stream = io.BytesIO()
    segmentation.save_as(stream)
    return stream.getvalue()
