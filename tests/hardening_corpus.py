"""A corpus of hostile and broken inputs, generated (no binary blobs): files, DICOM folders, /input layouts.

Each maker takes an empty folder `d` and lays out one /input there. The corpus is shared by
tests/test_hardening.py (the CLI), tests/test_hardening_containers.py (the image) and the fuzz target's
seeds (benchmarks/fuzz_inputs.py).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CT_UID_ROOT = "1.2.826.0.1.3680043.10.1234."


def small_ct(seed: int = 0, shape_zyx=(4, 40, 48)) -> np.ndarray:
    """A body-like int16 CT: air around a soft-tissue ellipse with a bright 'bone' inside (spans -1000..700 HU)."""
    z, y, x = shape_zyx
    yy, xx = np.mgrid[:y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.4 * x)) ** 2 < 1
    bone = ((yy - y / 2) / (0.08 * y)) ** 2 + ((xx - x / 2) / (0.08 * x)) ** 2 < 1
    noise = np.random.default_rng(seed).normal(0, 10, shape_zyx)
    slice_ = np.where(bone, 700, np.where(body, 40, -1000))
    return (slice_[None] + noise).astype(np.int16)


def write_image(array, path: Path, *, spacing=(4.0, 4.0, 8.0), compress=True, is_vector=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def mha_header(size, *, element_type="MET_SHORT", ndims=None, data=b"") -> bytes:
    """A MetaImage header claiming `size` voxels, followed by `data` (usually far less than it claims)."""
    ndims = ndims or len(size)
    return (
        f"ObjectType = Image\nNDims = {ndims}\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        f"DimSize = {' '.join(str(s) for s in size)}\nElementSpacing = {' '.join(['0.8'] * ndims)}\n"
        f"ElementType = {element_type}\nElementDataFile = LOCAL\n"
    ).encode() + data


def gzip_bomb(path: Path, *, inflated_mib: int = 512) -> Path:
    """A .nii.gz: a valid small NIfTI (48x40x4 int16), then gzip members of zeros inflating to `inflated_mib` MiB.

    Multi-member gzip is valid gzip; it costs kilobytes on disk and a few milliseconds to make.
    """
    small = path.with_name("bomb-core.nii")
    write_image(small_ct(), small, compress=False)
    core = gzip.compress(small.read_bytes())
    small.unlink()
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip member of 16 MiB of zeros
    member = zeros.compress(bytes(16 * 2**20)) + zeros.flush()
    path.write_bytes(core + member * (inflated_mib // 16))
    return path


# ------------------------------------------------------------------------------------------ DICOM


def dicom_slice(pixels: np.ndarray, *, z_mm: float, series_uid: str, study_uid: str, modality="CT",
                orientation=(1, 0, 0, 0, 1, 0), instance=1, spacing=(4.0, 4.0), position=None) -> Dataset:
    """A single-frame uncompressed CT image (the attributes a reader needs), int16 with rescale -1024 + 1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=CT_UID_ROOT)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = "hardening", "Corpus^Test", "20260101", "120000"
    ds.StudyID, ds.SeriesNumber = "1", 1
    # type 2 (present, may be empty): what a conforming CT carries and what a DICOM-SEG of it copies
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.AccessionNumber = "", "", "", ""
    ds.Modality = modality
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    ds.ImagePositionPatient = [float(v) for v in (position if position is not None else normal * z_mm)]
    ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
    ds.SliceThickness = 8.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.int16).tobytes()
    return ds


def dicom_series(folder: Path, *, n: int = 4, modality="CT", edit=None, seed: int = 0) -> Path:
    """n slices of small_ct() as one series in `folder`; edit(index, dataset) may change any slice."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = small_ct(seed, (n, 40, 48))
    study, series = generate_uid(prefix=CT_UID_ROOT), generate_uid(prefix=CT_UID_ROOT)
    for i in range(n):
        ds = dicom_slice(ct[i], z_mm=8.0 * i, series_uid=series, study_uid=study, modality=modality, instance=i + 1)
        if edit is not None:
            edit(i, ds)
        ds.save_as(folder / f"slice{i:03d}.dcm", enforce_file_format=True)
    return folder


def _non_image_dicom(path: Path, modality: str, sop_class: str) -> Path:
    """A SEG or RTSTRUCT-like object: right SOP class and modality, no image plane attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=CT_UID_ROOT)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(prefix=CT_UID_ROOT), generate_uid(prefix=CT_UID_ROOT)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def enhanced_ct(path: Path) -> Path:
    """An Enhanced CT object: multi-frame, its plane positions in the functional groups (not top level)."""
    frames = small_ct(0, (3, 40, 48))
    ds = dicom_slice(frames[0], z_mm=0, series_uid=generate_uid(prefix=CT_UID_ROOT), study_uid=generate_uid(prefix=CT_UID_ROOT))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.NumberOfFrames = 3
    ds.PixelData = (frames.astype(np.int32) + 1024).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicomdir_fileset(folder: Path) -> Path:
    """A DICOM File-set (DICOMDIR plus the series in PT*/ST*/SE* folders), written by pydicom."""
    from pydicom.fileset import FileSet

    staging = dicom_series(folder.with_name(folder.name + "-staging"))
    fileset = FileSet()
    for path in sorted(staging.iterdir()):
        fileset.add(pydicom.dcmread(path))
    folder.mkdir(parents=True, exist_ok=True)
    fileset.write(folder)
    for path in staging.iterdir():
        path.unlink()
    staging.rmdir()
    return folder


# --------------------------------------------------------------------------- inputs.json payloads


def socket(slug="ct-image", relative_path="images/ct", kind="Image") -> dict:
    return {"interface": {"title": slug, "slug": slug, "kind": kind, "super_kind": "Image" if kind in ("Image", "Segmentation") else "Value",
                          "relative_path": relative_path}, "image": {"pk": "x", "name": "x.mha"}, "value": None, "file": None}


def write_inputs_json(d: Path, entries) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "inputs.json").write_text(entries if isinstance(entries, str) else json.dumps(entries))
