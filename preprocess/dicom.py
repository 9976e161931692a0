"""DICOM series logic: pick the CT series in a folder, order slices along the normal, refuse gaps.

pydicom reads headers only; SimpleITK (GDCM) decodes each slice's pixels, rescale applied.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import VR

from common.errors import InputError
from preprocess.geometry import Geometry
from preprocess.intensity import check_hu_range

#: relative tolerance on slice spacing before a series counts as having gaps
SPACING_TOLERANCE = 0.05


@dataclass(frozen=True)
class DicomSeries:
    """The files of one CT series chosen in a study (preprocess/study.py): reading it reads exactly these files."""

    folder: Path  # where the study lies (messages; the DICOM-SEG names it)
    files: tuple[Path, ...]
    series_uid: str  # SeriesInstanceUID, "" when the files have none

    @property
    def name(self) -> str:
        return self.folder.name

    def __str__(self) -> str:
        return f"{self.folder} (series {self.series_uid or 'without SeriesInstanceUID'})"


@dataclass(frozen=True)
class UnusableStudy:
    """A study with no axial CT series to segment: reading it raises InputError with `reason` (what was found)."""

    folder: Path
    reason: str

    @property
    def name(self) -> str:
        return self.folder.name

    def __str__(self) -> str:
        return str(self.folder)


#: SOP classes that hold no single-frame CT slice of a series
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_ENHANCED_CT_CLASSES = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}  # Enhanced CT, Legacy Converted Enhanced CT


#: every attribute this module reads from a header
_KEYWORDS_USED = ("SOPClassUID", "Modality", "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                  "Rows", "Columns", "SeriesInstanceUID", "SliceThickness", "DirectoryRecordSequence",
                  # preprocess/study.py: grouping a study and choosing its series
                  "StudyInstanceUID", "ImageType", "ConvolutionKernel", "SeriesDescription", "SeriesNumber", "Manufacturer")


def read_header(path: Path):
    """The header of a DICOM file, or None for a file that is not DICOM.

    pydicom's exceptions on hostile bytes are no closed set (InvalidDicomError, BytesLengthException,
    struct, Unicode and value errors, ...; benchmarks/fuzz_inputs.py found several), so any failure to
    parse means "not a DICOM file" here; a folder left with no CT says so by name.
    """
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception:  # see above: a file pydicom cannot parse is not a readable DICOM file
        return None
    for keyword in _KEYWORDS_USED:  # pydicom converts a value on its first use: a malformed one fails here, by name
        try:
            header.get(keyword)
        except Exception as error:  # e.g. NotImplementedError for an unknown VR (found by the dicom fuzz target)
            raise InputError(f"{path}: its DICOM attribute {keyword} cannot be read ({type(error).__name__})") from None
    return header


def _floats(header, keyword: str, count: int, path: Path) -> tuple[float, ...]:
    """A numeric multi-valued attribute, checked: present, `count` finite numbers (a text value is no list of numbers:
    iterating "100000" gives six digits, found by the dicom fuzz target)."""
    value = header.get(keyword)
    try:
        if value is None or isinstance(value, (str, bytes)):
            raise TypeError(keyword)
        values = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{path}: {keyword} is missing or not numeric") from None
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise InputError(f"{path}: {keyword} must be {count} finite numbers, got {list(values)[:8]}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class SlicePlane:
    """Where one CT slice lies, parsed and checked once from its header.

    pydicom converts an element on its first use, and a malformed one can read differently (or be gone) at the
    second look (found by the dicom fuzz target), so ordering and stacking use these values, never the header.
    """

    path: Path
    orientation: tuple[float, ...]  # ImageOrientationPatient: row cosine then column cosine (6)
    position_mm: tuple[float, float, float]  # ImagePositionPatient: the first pixel's centre
    pixel_spacing_mm: tuple[float, float]  # PixelSpacing: (between rows = y, between columns = x)
    rows: int
    columns: int
    thickness_mm: float | None  # SliceThickness as written (checked where it is used: a single slice), None if absent or no number


def read_slice_plane(path: Path, header) -> SlicePlane:
    """The slice's plane, or InputError when a geometry attribute is missing or malformed (they decide the voxel grid)."""
    orientation = _floats(header, "ImageOrientationPatient", 6, path)
    position = _floats(header, "ImagePositionPatient", 3, path)
    spacing = _floats(header, "PixelSpacing", 2, path)
    if min(spacing) <= 0:
        raise InputError(f"{path}: PixelSpacing must be positive, got {list(spacing)}")
    try:
        rows, columns = int(header.Rows), int(header.Columns)
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"{path}: Rows/Columns missing") from None
    if rows < 8 or columns < 8:
        raise InputError(f"{path}: slice of {columns}x{rows} pixels is too small to be an axial CT")
    row_cosine, col_cosine = np.reshape(orientation, (2, 3))
    if np.linalg.norm(np.cross(row_cosine, col_cosine)) < 0.5:
        raise InputError(f"{path}: ImageOrientationPatient {list(orientation)} has no valid slice normal")
    try:
        thickness = float(header.get("SliceThickness"))
    except (TypeError, ValueError, OverflowError):
        thickness = None
    return SlicePlane(path=Path(path), orientation=orientation, position_mm=position, pixel_spacing_mm=spacing,
                      rows=rows, columns=columns, thickness_mm=thickness)


@dataclass(frozen=True)
class CtSlice:
    """One CT image file of a series: its header (for writers that copy attributes) and its checked plane."""

    path: Path
    header: object  # pydicom Dataset
    plane: SlicePlane


#: the value representations of the DICOM standard (PS3.5 6.2), as pydicom names them
_KNOWN_VRS = frozenset(vr.value for vr in VR)


#: the length a DICOM element declares when its end is marked by a delimiter instead (sequences, encapsulated pixels)
_UNDEFINED_LENGTH = 0xFFFFFFFF


def check_element_encoding(path: Path, dataset) -> None:
    """Refuse an element GDCM would read differently from pydicom, at any depth, before GDCM reads the file.

    GDCM trusts what a file declares and allocates it up front; pydicom reads what is there. Two findings of the
    dicom fuzz target, each passing every other check: an explicit VR that is none of the standard's (pydicom
    reads a 2-byte length after it, GDCM a 4-byte one: a 4.7 kB slice with a private element of VR 'D(' made
    SimpleITK take 1.2 GB), and a defined length longer than the file (pixel data declaring 4 GB, 3844 bytes
    there: 4.2 GB and 11-19 s in GDCM). pydicom keeps each element raw until it is used, so nothing is converted.
    """
    pending = [dataset.file_meta, dataset] if getattr(dataset, "file_meta", None) is not None else [dataset]
    while pending:
        current = pending.pop()
        for tag in list(current.keys()):
            raw = current._dict[tag]  # the element as read: a RawDataElement until its value is first used
            if raw.VR is None:  # implicit VR: both parsers take it from the data dictionary (UN when private)
                vr = dictionary_VR(tag) if dictionary_has_tag(tag) else "UN"
            else:
                vr = str(raw.VR)
            if vr not in _KNOWN_VRS:
                raise InputError(f"{path}: element {tag} has the value representation {vr!r}, which DICOM does not define")
            declared, value = getattr(raw, "length", None), getattr(raw, "value", None)
            if declared not in (None, _UNDEFINED_LENGTH) and isinstance(value, bytes) and len(value) < declared:
                raise InputError(f"{path}: element {tag} declares {declared} bytes but the file holds {len(value)}: truncated or corrupt")
            if vr == "SQ":
                try:
                    items = list(current[tag].value)
                except Exception as error:  # parsing a sequence's items is parsing hostile bytes: no closed set
                    raise InputError(f"{path}: sequence {tag} cannot be parsed ({type(error).__name__})") from None
                pending.extend(items)


def check_pixel_data(path: Path) -> None:
    """Refuse a slice whose pixel data is missing, or shorter than Rows x Columns need, before GDCM decodes it.

    GDCM trusts a declared length: a 1 kB file declaring 250 MB of pixel data made SimpleITK take 3.3 GB
    and 5 s before failing (found by the dicom fuzz target). pydicom reads what is there (1-2 ms a slice
    against GDCM's ~30 ms decode). Compressed (encapsulated) pixel data is left to GDCM.
    """
    try:
        dataset = pydicom.dcmread(path)
    except Exception:  # the header parsed before (read_header); what fails now is the data after it
        raise InputError(f"{path}: cannot parse its pixel data") from None
    check_element_encoding(path, dataset)  # first: reading a value below turns its raw element (declared length) into a value
    try:
        pixel_data = dataset.get("PixelData")
        compressed = bool(dataset.file_meta.TransferSyntaxUID.is_compressed)
        needed = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1) or 1) * int(dataset.BitsAllocated) // 8
    except Exception:  # the header parsed before (read_header); what fails now is the data after it, or its description
        raise InputError(f"{path}: cannot parse its pixel data or the attributes that describe it") from None
    if not pixel_data:
        raise InputError(f"{path}: no pixel data (missing, or cut short)")
    if not compressed and len(pixel_data) < needed:
        raise InputError(f"{path}: pixel data holds {len(pixel_data)} bytes where Rows x Columns need {needed}: truncated")


def _series_key(header, plane: SlicePlane) -> tuple:
    uid = str(header.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return ("uid", uid)
    return ("geometry", tuple(np.round(plane.orientation, 4)), tuple(np.round(plane.pixel_spacing_mm, 4)), plane.rows, plane.columns)


def _classify(path: Path, header) -> tuple[tuple, SlicePlane] | str | None:
    """(its series key, its plane) for a usable CT slice, the modality (text) of another object, None for what to
    skip (a DICOMDIR). Key and plane are read here, once (see SlicePlane). The two kinds of answer have different
    types: a modality spelt "ct" (not "CT") is another object, never mistaken for a slice (found by the fuzz target)."""
    sop_class = str(header.get("SOPClassUID", "") or getattr(header.get("file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in header:
        return None
    modality = str(header.get("Modality", "") or "")
    if modality != "CT":
        return modality or ("unknown" if "SOPClassUID" in header else None)
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 2
    if frames > 1 or sop_class in _ENHANCED_CT_CLASSES:
        raise InputError(f"{path}: multi-frame (enhanced) CT is not supported; export single-frame slices")
    if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
        raise InputError(f"{path}: CT slice without ImagePositionPatient/ImageOrientationPatient: cannot place it")
    plane = read_slice_plane(path, header)
    return _series_key(header, plane), plane


def list_ct_slices(source: Path | DicomSeries) -> list[CtSlice]:
    """Headers of the CT image slices of the one CT series in `source`: a folder (searched recursively) or a DicomSeries.

    Files that are not DICOM, and a DICOMDIR, are skipped; DICOM objects of other modalities (MR, SEG,
    RTSTRUCT, ...) are skipped and named when no CT is left.
    """
    if isinstance(source, DicomSeries):
        folder, files = source.folder, sorted(source.files)
    else:
        folder = Path(source)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: folder is empty")
    series: dict[tuple, list] = defaultdict(list)
    other_modalities = set()
    for path in files:
        header = read_header(path)
        if header is None:
            continue
        try:
            found = _classify(path, header)
        except InputError:
            raise
        except Exception as error:  # pydicom converts elements lazily: a malformed value surfaces here
            raise InputError(f"{path}: malformed DICOM header ({type(error).__name__}: {' '.join(str(error).split())[:160]})") from None
        if isinstance(found, tuple):
            key, plane = found
            series[key].append(CtSlice(path=path, header=header, plane=plane))
        elif found is not None:
            other_modalities.add(found)
    if not series:
        found = f" (found modality {', '.join(sorted(other_modalities))})" if other_modalities else ""
        raise InputError(f"{folder}: no CT image slices found{found}")
    if len(series) > 1:
        sizes = ", ".join(str(len(v)) for v in series.values())
        raise InputError(f"{folder}: holds {len(series)} CT series ({sizes} slices); give one series per folder")
    return next(iter(series.values()))


def sort_slices(planes: list[SlicePlane], folder: Path) -> tuple[list[Path], Geometry]:
    """Order slices along the slice normal and derive the volume geometry; refuse gaps and duplicates."""
    first = planes[0]
    row_cosine, col_cosine = np.reshape(first.orientation, (2, 3))
    normal = np.cross(row_cosine, col_cosine)
    orientations = np.array([p.orientation for p in planes])
    sizes = np.array([(p.rows, p.columns) for p in planes])
    turned = np.any(np.abs(orientations - orientations[0]) > 1e-3, axis=1)
    if turned.any():
        raise InputError(f"{planes[int(np.argmax(turned))].path}: slice orientation differs from the rest of the series in {folder}")
    resized = np.any(sizes != sizes[0], axis=1)
    if resized.any():
        raise InputError(f"{planes[int(np.argmax(resized))].path}: slice size differs from the rest of the series in {folder}")
    positions = np.array([p.position_mm for p in planes])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    if len(steps):
        if np.any(steps < 1e-3):
            raise InputError(f"{folder}: two slices share the same position ({along[np.argmax(steps < 1e-3)]:.2f} mm)")
        step = float(np.median(steps))
        bad = np.abs(steps - step) > SPACING_TOLERANCE * step
        if np.any(bad):
            where = int(np.argmax(bad))
            raise InputError(
                f"{folder}: slice spacing is not uniform (gap of {steps[where]:.2f} mm where {step:.2f} mm is "
                f"expected, after position {along[where]:.2f} mm): missing slices?"
            )
    else:
        step = 1.0 if first.thickness_mm is None else first.thickness_mm
        if not np.isfinite(step) or step <= 0:
            raise InputError(f"{first.path}: a single slice needs a positive SliceThickness, got {step!r}")
    spacing_y, spacing_x = first.pixel_spacing_mm
    direction = np.column_stack([row_cosine, col_cosine, normal])
    geometry = Geometry(
        size_xyz=(first.columns, first.rows, len(planes)),
        spacing_mm=(spacing_x, spacing_y, step),
        origin_mm=tuple(float(v) for v in positions[order[0]]),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return [planes[i].path for i in order], geometry


def read_dicom_series(source: Path | DicomSeries | UnusableStudy, *, check_size=None) -> tuple[np.ndarray, Geometry]:
    """Read the single CT series in `source` (a folder, or the series a study chose) as HU (volume_zyx, Geometry).

    Headers only until the series is chosen, ordered and (with `check_size`, see preprocess.io.read_ct)
    found to fit the memory budget; then each slice's pixels are decoded.
    """
    if isinstance(source, UnusableStudy):
        raise InputError(f"{source.folder}: {source.reason}")
    folder = source.folder if isinstance(source, DicomSeries) else Path(source)
    paths, geometry = sort_slices([s.plane for s in list_ct_slices(source)], folder)
    if check_size is not None:
        check_size(geometry.size_xyz, stored_bytes_per_voxel=2, source=folder)
    volume = None
    for index, path in enumerate(paths):
        check_pixel_data(path)
        try:
            pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except (RuntimeError, MemoryError) as error:
            raise InputError(f"{path}: cannot decode pixel data ({str(error).strip().splitlines()[-1][:160]})") from None
        pixels = pixels.reshape(pixels.shape[-2:]) if pixels.size == geometry.size_xyz[0] * geometry.size_xyz[1] else None
        if pixels is None:
            raise InputError(f"{path}: pixel data does not match its Rows/Columns")
        if volume is None:
            dtype = np.int16 if pixels.dtype.kind in "iu" else np.float32
            volume = np.empty(geometry.shape_zyx, dtype=dtype)
        if volume.dtype == np.int16 and pixels.dtype.kind in "iu" and (pixels.min() < -32768 or pixels.max() > 32767):
            volume = volume.astype(np.float32)
        if pixels.dtype.kind == "f" and volume.dtype == np.int16:
            volume = volume.astype(np.float32)
        volume[index] = pixels
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise InputError(f"{folder}: DICOM series decodes to NaN or infinite voxels")
    check_hu_range(volume, folder)
    return volume, geometry
