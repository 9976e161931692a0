"""A PACS-like CT study built from the real DICOM sample: the series a site's export holds, small and fast.

The sample's first slices (by position), cropped to their central pixels and stored uncompressed, become:
    soft     axial, kernel Br38f (Siemens soft tissue), 3 mm, 8 slices       <- the rule's choice
    lung     the same slices, kernel Br64f (sharp), a new SeriesInstanceUID
    thick    every other slice, 6 mm
    phase2   a second phase ("Venous"), Br38f, 3 mm, 6 slices
    scout    a localizer: one coronal slice, ImageType LOCALIZER
    coronal  a coronal reformat: ImageType DERIVED, 4 coronal slices
    dose_sr  a dose report: Modality SR, X-Ray Radiation Dose SR, no pixels
    dose_sc  a dose page as a secondary capture with Modality CT
Every object carries a patient name and ID, so that tests can check no case id ever shows them.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = "1.2.826.0.1.3680043.10.1499."  # UIDs made here (pydicom's generate_uid under a test prefix)
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-4711"
CROP = 96
SOFT_SLICES = 8


def uid() -> str:
    return generate_uid(prefix=ROOT)


@dataclass(frozen=True)
class BuiltStudy:
    study_uid: str
    series: dict  # role -> (SeriesInstanceUID, [datasets])

    def uid_of(self, role: str) -> str:
        return self.series[role][0]

    def datasets(self):
        for _, items in self.series.values():
            yield from items


def sample_slices(folder: Path) -> list[tuple[Dataset, np.ndarray]]:
    """The sample's first SOFT_SLICES slices by position, each (header, HU cropped to CROP x CROP around the centre)."""
    headers = sorted(((p, pydicom.dcmread(p)) for p in sorted(folder.iterdir())), key=lambda item: float(item[1].ImagePositionPatient[2]))
    out = []
    for path, header in headers[:SOFT_SLICES]:
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).reshape(int(header.Rows), int(header.Columns))
        r0, c0 = (int(header.Rows) - CROP) // 2, (int(header.Columns) - CROP) // 2
        crop = np.ascontiguousarray(hu[r0:r0 + CROP, c0:c0 + CROP]).astype(np.int16)
        row_cos, col_cos = np.asarray(header.ImageOrientationPatient, float).reshape(2, 3)
        row_mm, col_mm = (float(v) for v in header.PixelSpacing)
        position = np.asarray(header.ImagePositionPatient, float) + c0 * col_mm * row_cos + r0 * row_mm * col_cos
        header.ImagePositionPatient = [round(float(v), 4) for v in position]
        out.append((header, crop))
    return out


def _image(header: Dataset, pixels: np.ndarray, *, study_uid: str, frame_uid: str, series_uid: str, number: int, description: str, kernel: str,
           thickness: float, instance: int, image_type=("ORIGINAL", "PRIMARY", "AXIAL")) -> Dataset:
    ds = copy.deepcopy(header)
    for keyword in ("LargestImagePixelValue", "SmallestImagePixelValue", "PixelPaddingValue", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.set_pixel_data(pixels.astype(np.int16), photometric_interpretation="MONOCHROME2", bits_stored=16)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesNumber, ds.InstanceNumber = number, instance
    ds.SeriesDescription, ds.ConvolutionKernel, ds.SliceThickness = description, kernel, thickness
    ds.ImageType = list(image_type)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.StudyID, ds.AccessionNumber, ds.StudyDescription = "1", "ACC1", "CT abdomen"
    return ds


def _dose_sr(study_uid: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    meta.MediaStorageSOPInstanceUID = uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SR", study_uid, series_uid
    ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 990, 1, "Dose Report"
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = PATIENT_NAME, PATIENT_ID, "20221208", "120000"
    ds.StudyID, ds.AccessionNumber, ds.StudyDescription = "1", "ACC1", "CT abdomen"
    ds.CompletionFlag, ds.VerificationFlag, ds.ContentDate, ds.ContentTime = "COMPLETE", "UNVERIFIED", "20221208", "120000"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = Sequence([code])
    ds.ValueType = "CONTAINER"
    return ds


def build_study(slices: list[tuple[Dataset, np.ndarray]]) -> BuiltStudy:
    """The eight series of the module docstring, as datasets (write them with write_flat / write_nested / write_dicomdir)."""
    study, frame = uid(), uid()
    series = {}

    def add(role, items_of):
        series_uid = uid()
        series[role] = (series_uid, items_of(series_uid))

    add("soft", lambda s: [_image(h, p, study_uid=study, frame_uid=frame, series_uid=s, number=2, description="Abdomen 3.0 Br38f", kernel="Br38f",
                                  thickness=3.0, instance=i + 1) for i, (h, p) in enumerate(slices)])
    add("lung", lambda s: [_image(h, p, study_uid=study, frame_uid=frame, series_uid=s, number=3, description="Lung 3.0 Br64f", kernel="Br64f",
                                  thickness=3.0, instance=i + 1) for i, (h, p) in enumerate(slices)])
    add("thick", lambda s: [_image(h, p, study_uid=study, frame_uid=frame, series_uid=s, number=4, description="Abdomen 6.0 Br38f", kernel="Br38f",
                                   thickness=6.0, instance=i + 1) for i, (h, p) in enumerate(slices[::2])])
    add("phase2", lambda s: [_image(h, p, study_uid=study, frame_uid=frame, series_uid=s, number=5, description="Venous 3.0 Br38f", kernel="Br38f",
                                    thickness=3.0, instance=i + 1) for i, (h, p) in enumerate(slices[:6])])

    def coronal(s, *, count, number, description, image_type):
        items = []
        header, pixels = slices[0]
        for i in range(count):
            ds = _image(header, pixels, study_uid=study, frame_uid=frame, series_uid=s, number=number, description=description, kernel="Br38f",
                        thickness=3.0, instance=i + 1, image_type=image_type)
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
            x, y, z = (float(v) for v in header.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y + 3.0 * i, z + 100.0]
            items.append(ds)
        return items

    add("scout", lambda s: coronal(s, count=1, number=1, description="Topogram 0.6 T20s", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    add("coronal", lambda s: coronal(s, count=4, number=6, description="Cor 3.0 Br38f", image_type=("DERIVED", "SECONDARY", "REFORMATTED")))
    add("dose_sr", lambda s: [_dose_sr(study, s)])

    def screen(s):
        header, pixels = slices[0]
        ds = _image(header, pixels, study_uid=study, frame_uid=frame, series_uid=s, number=991, description="Patient Protocol", kernel="", thickness=3.0,
                    instance=1, image_type=("DERIVED", "SECONDARY", "OTHER"))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "ConvolutionKernel"):
            delattr(ds, keyword)
        return [ds]

    add("dose_sc", screen)
    return BuiltStudy(study_uid=study, series=series)


def _name(ds: Dataset) -> str:
    """A file name that says nothing of the series (PACS exports name files by UID or counter)."""
    return hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:16] + ".dcm"


def write_flat(study: BuiltStudy, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for ds in study.datasets():
        ds.save_as(folder / _name(ds), enforce_file_format=True)
    return folder


def write_nested(study: BuiltStudy, folder: Path) -> Path:
    for role, (_, items) in study.series.items():
        (folder / f"series-{items[0].SeriesNumber}").mkdir(parents=True, exist_ok=True)
        for ds in items:
            ds.save_as(folder / f"series-{ds.SeriesNumber}" / f"IM{int(ds.InstanceNumber):05d}", enforce_file_format=True)
    return folder


def write_dicomdir(study: BuiltStudy, folder: Path) -> Path:
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for ds in study.datasets():
        fileset.add(ds)
    folder.mkdir(parents=True, exist_ok=True)
    fileset.write(folder)
    return folder / "DICOMDIR"
