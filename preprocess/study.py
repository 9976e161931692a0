"""DICOM studies as a PACS exports them: the studies among some files, their series, and the CT series to segment.

Headers only (pydicom, stop_before_pixels): no pixel is decoded until the chosen series is read.

- A study is every file of one StudyInstanceUID (files without one: those of one folder). Its series are
  its files of one SeriesInstanceUID (CT slices without one: those of one geometry, as preprocess/dicom.py).
- A series that is not an axial CT volume is dropped, with its reason (DROP REASONS in docs/inputs.md):
  not CT (a dose report SR, SEG, RTSTRUCT, ...), a secondary capture, a localizer, multi-frame CT,
  a non-axial reformat, geometry that cannot place or stack its slices, fewer than `min_slices` slices.
- The rest are ranked (`rank_key`, the RULE in docs/inputs.md): soft-tissue kernel, then unknown, then
  sharp (KERNEL_TABLE); then the slice thickness nearest the model's training spacing; then most slices;
  then the SeriesInstanceUID. Never a file name. `SeriesRule` holds the overrides (--series-uid,
  --series-description, --all-series).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from pydicom.dataset import Dataset

from preprocess.dicom import read_header, read_slice_plane, sort_slices
from common.errors import InputError

#: a series of fewer slices is no volume to segment (a localizer has 1-3)
MIN_SLICES = 4
#: the rule's target thickness when no model is at hand (the bundled demo model's spacing); process.py passes the loaded model's
DEFAULT_TARGET_MM = 1.5

#: (pattern, class), matched in order against the first value of ConvolutionKernel (case-insensitive, whole value)
KERNEL_TABLE = (
    # GE: named kernels
    (r"STANDARD|STND|SOFT|SMOOTH", "soft"),
    (r"LUNG|BONE|BONE\s*PLUS|BONE\+|EDGE|DETAIL|SHARP|CHEST|ULTRA", "sharp"),
    # Canon / Toshiba: FC01-FC29 body and abdomen, FC30 and above bone, lung and high resolution
    (r"FC[0-2]\d", "soft"),
    (r"FC[3-9]\d", "sharp"),
    # Philips: filter letters; A smooth, B standard, UB/SB soft-tissue; D, E, EC sharp, L lung, Y* bone
    (r"A|B|UB|SB", "soft"),
    (r"D|E|EC|L|YA|YB|YC|YD|YE|YF", "sharp"),
    # Siemens: letter(s), two digits, optional suffix (B30f, Br38f, I30f, Qr40d, Bv36, Hr38): below 50 soft, 50 and above sharp
    (r"[A-Z][a-z]?[0-4]\d[a-z]?\d?", "soft"),
    (r"[A-Z][a-z]?[5-9]\d[a-z]?\d?", "sharp"),
    # any vendor: a word in the name (Canon AiCE "Body Sharp" is sharp: sharp words are tried first)
    (r".*(LUNG|BONE|SHARP|EDGE|DETAIL|HIGH.?RES).*", "sharp"),
    (r".*(SOFT|STANDARD|BODY|SMOOTH|ABDOM|MEDIASTIN).*", "soft"),
)
KERNEL_RANK = {"soft": 0, "unknown": 1, "sharp": 2}

_CT_IMAGE_CLASS = "1.2.840.10008.5.1.4.1.1.2"
_ENHANCED_CT_CLASSES = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture and its multi-frame kinds (.7.1 - .7.4)
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_MODALITY_NOTES = {"SR": "a structured report, e.g. a dose report", "SEG": "a segmentation", "RTSTRUCT": "an RT structure set",
                   "PR": "a presentation state", "KO": "a key object selection", "DOC": "a document", "OT": "other"}
#: what a series keeps of each header (grouping, choosing, and sort_slices' geometry checks)
_KEPT = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
         "ImageType", "ConvolutionKernel", "Manufacturer", "SliceThickness", "NumberOfFrames", "ImagePositionPatient",
         "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


@dataclass(frozen=True)
class Series:
    """One series of a study, from its headers; `dropped` says why it is no axial CT volume (None: a candidate)."""

    series_uid: str
    number: int | None
    description: str
    modality: str
    kernel: str
    kernel_class: str  # soft, sharp or unknown (KERNEL_TABLE)
    thickness_mm: float | None  # SliceThickness, else the spacing of its slices
    slices: int  # image files
    files: tuple[Path, ...]
    dropped: str | None

    def summary(self) -> dict:
        return {"series_uid": self.series_uid, "series_number": self.number, "description": self.description, "modality": self.modality,
                "kernel": self.kernel, "kernel_class": self.kernel_class,
                "thickness_mm": None if self.thickness_mm is None else round(self.thickness_mm, 3), "slices": self.slices}

    def label(self) -> str:
        """How a message names it: number and description (no UID: they are long), its modality and file count."""
        number = f"series {self.number}" if self.number is not None else f"series {self.series_uid[-12:] or '(no UID)'}"
        return f"{number} '{self.description}' ({self.modality or '?'}, {self.slices} file{'s' if self.slices != 1 else ''})"


@dataclass(frozen=True)
class Study:
    key: str  # the StudyInstanceUID, or "folder:<path>" for files without one
    study_uid: str
    folder: Path  # the smallest folder holding all its files
    series: tuple[Series, ...]


@dataclass(frozen=True)
class SeriesRule:
    """How to choose: the ranking's target thickness, the minimum slice count, and the overrides."""

    target_thickness_mm: float = DEFAULT_TARGET_MM
    min_slices: int = MIN_SLICES
    series_uid: str | None = None  # --series-uid: exactly this series (the studies without it are no case)
    description: str | None = None  # --series-description: a regular expression the SeriesDescription must match (re.search, any case)
    all_series: bool = False  # --all-series: every axial CT series is a case of its own

    def __post_init__(self):
        if not (self.target_thickness_mm > 0 and math.isfinite(self.target_thickness_mm)):
            raise ValueError(f"target thickness must be a positive number, got {self.target_thickness_mm}")
        if self.description is not None:
            try:
                re.compile(self.description)
            except re.error as error:
                raise InputError(f"--series-description {self.description!r} is not a regular expression ({error})") from None


@dataclass(frozen=True)
class SeriesChoice:
    chosen: tuple[Series, ...]  # one, or every candidate with --all-series
    why: str
    skipped: tuple[tuple[Series, str], ...]

    def report(self, chosen: Series) -> dict:
        """results.json's account: the series segmented, why, and every other series with the reason it was not."""
        others = [s for s in self.chosen if s is not chosen]
        return {"chosen": {**chosen.summary(), "why": self.why},
                "skipped": [{**s.summary(), "reason": "segmented as a case of its own (--all-series)"} for s in others]
                + [{**s.summary(), "reason": reason} for s, reason in self.skipped]}


def classify_kernel(kernel: str) -> str:
    """soft, sharp or unknown, by KERNEL_TABLE."""
    text = kernel.strip()
    if not text:
        return "unknown"
    for pattern, kind in KERNEL_TABLE:
        flags = 0 if pattern.startswith("[A-Z][a-z]") else re.IGNORECASE  # Siemens' case tells "Br38f" from a word
        if re.fullmatch(pattern, text, flags):
            return kind
    return "unknown"


def _text(header, keyword: str) -> str:
    value = header.get(keyword)
    if value is None:
        return ""
    if keyword in ("ConvolutionKernel",) and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        value = next(iter(value), "")
    return " ".join(str(value).split())


def _slim(header) -> Dataset:
    kept = Dataset()
    for keyword in _KEPT:
        if keyword in header:
            kept.add(header[keyword])
    return kept


def scan_headers(files: Iterable[Path]) -> list[tuple[Path, Dataset]]:
    """(path, the header's attributes this module uses) of every DICOM object among `files`; not DICOM and DICOMDIRs skipped."""
    records = []
    for path in files:
        header = read_header(path)
        if header is None:
            continue
        sop_class = str(header.get("SOPClassUID", "") or getattr(header.get("file_meta", None), "MediaStorageSOPClassUID", "") or "")
        if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in header:
            continue
        try:
            records.append((Path(path), _slim(header)))
        except Exception as error:  # pydicom converts lazily: a malformed value surfaces when copied
            raise InputError(f"{path}: malformed DICOM header ({type(error).__name__}: {' '.join(str(error).split())[:160]})") from None
    return records


def _series_key(path: Path, header) -> tuple:
    uid = _text(header, "SeriesInstanceUID")
    if uid:
        return ("uid", uid)
    try:  # CT slices without a UID: one series per geometry, as preprocess/dicom.py groups them
        orientation = tuple(np.round(np.asarray(header.ImageOrientationPatient, dtype=float), 4))
        spacing = tuple(np.round(np.asarray(header.PixelSpacing, dtype=float), 4))
        return ("geometry", _text(header, "Modality"), orientation, spacing, int(header.Rows), int(header.Columns))
    except (AttributeError, TypeError, ValueError):
        return ("file", str(path))


def _plane(orientation) -> str:
    row, column = np.asarray(orientation, dtype=float).reshape(2, 3)
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(np.cross(row, column))))]


def _drop_reason(items: list[tuple[Path, Dataset]]) -> tuple[str | None, float | None]:
    """Why this series is no axial CT volume (None: it is one), and its slice spacing when it was stacked."""
    first = items[0][1]
    modality = _text(first, "Modality")
    sop_class = _text(first, "SOPClassUID")
    if modality != "CT":
        note = _MODALITY_NOTES.get(modality, "")
        return f"not CT: modality {modality or 'missing'}{f' ({note})' if note else ''}", None
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (a saved screen, e.g. a dose page): not a CT volume", None
    image_type = first.get("ImageType") or []
    image_type = {str(v).strip().upper() for v in ([image_type] if isinstance(image_type, str) else image_type)}
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer (ImageType LOCALIZER)", None
    frames = []
    for _, header in items:
        try:
            frames.append(int(header.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            frames.append(2)
    if max(frames) > 1 or sop_class in _ENHANCED_CT_CLASSES:
        return "multi-frame (enhanced) CT is not supported; export single-frame slices", None
    if sop_class and sop_class != _CT_IMAGE_CLASS:
        return f"SOP class {sop_class} is not CT Image Storage", None
    for path, header in items:
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            return f"{path}: CT slice without ImagePositionPatient/ImageOrientationPatient: cannot place it", None
    try:  # the reader's own checks: what it would refuse is dropped here, with its message
        planes = [read_slice_plane(path, header) for path, header in items]
    except InputError as error:
        return str(error), None
    plane = _plane(planes[0].orientation)
    if plane != "axial":
        derived = " reformat (ImageType DERIVED)" if "DERIVED" in image_type else ""
        return f"{plane}{derived} images: not axial", None
    try:
        _, geometry = sort_slices(planes, items[0][0].parent)
    except InputError as error:
        return f"not one volume: {error}", None
    return None, float(geometry.spacing_mm[2])


def summarise_series(items: list[tuple[Path, Dataset]]) -> Series:
    first = items[0][1]
    dropped, spacing = _drop_reason(items)
    kernel = _text(first, "ConvolutionKernel")
    try:
        thickness = float(first.get("SliceThickness")) if first.get("SliceThickness") not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    if thickness is not None and not (math.isfinite(thickness) and thickness > 0):
        thickness = None
    try:
        number = int(first.get("SeriesNumber")) if first.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    return Series(series_uid=_text(first, "SeriesInstanceUID"), number=number, description=_text(first, "SeriesDescription"),
                  modality=_text(first, "Modality"), kernel=kernel, kernel_class=classify_kernel(kernel),
                  thickness_mm=thickness if thickness is not None else spacing, slices=len(items),
                  files=tuple(sorted(p for p, _ in items)), dropped=dropped)


def group_studies(records: list[tuple[Path, Dataset]]) -> list[Study]:
    """The studies among the scanned headers, in order of their folder, then key."""
    by_study: dict[str, list] = defaultdict(list)
    for path, header in records:
        uid = _text(header, "StudyInstanceUID")
        by_study[uid or f"folder:{path.parent}"].append((path, header))
    studies = []
    for key, items in by_study.items():
        by_series: dict[tuple, list] = defaultdict(list)
        for path, header in items:
            by_series[_series_key(path, header)].append((path, header))
        series = sorted((summarise_series(group) for group in by_series.values()),
                        key=lambda s: (s.number if s.number is not None else 1 << 30, s.series_uid, s.files))
        folder = Path(os.path.commonpath([str(p.parent) for p, _ in items]))
        studies.append(Study(key=key, study_uid="" if key.startswith("folder:") else key, folder=folder, series=tuple(series)))
    return sorted(studies, key=lambda s: (str(s.folder), s.key))


def rank_key(series: Series, target_mm: float) -> tuple:
    """The RULE: soft-tissue kernel first, then thickness nearest `target_mm`, then most slices, then SeriesInstanceUID."""
    distance = abs(series.thickness_mm - target_mm) if series.thickness_mm is not None else math.inf
    return (KERNEL_RANK[series.kernel_class], round(distance, 3), -series.slices, series.series_uid)


def _mm(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g} mm"


def _why_after(chosen: Series, other: Series, target_mm: float) -> str:
    """Which step of the rule put `other` after `chosen`."""
    a, b = rank_key(chosen, target_mm), rank_key(other, target_mm)
    if a[0] != b[0]:
        return (f"kernel {other.kernel or '(not stated)'} is {other.kernel_class}; the chosen series' "
                f"{chosen.kernel or '(not stated)'} is {chosen.kernel_class} (soft-tissue kernels first)")
    if a[1] != b[1]:
        return (f"slice thickness {_mm(other.thickness_mm)} is further from the model's {target_mm:g} mm than the chosen "
                f"series' {_mm(chosen.thickness_mm)}")
    if a[2] != b[2]:
        return f"{other.slices} slices, fewer than the chosen series' {chosen.slices}"
    return "same kernel class, thickness and slice count as the chosen series: its SeriesInstanceUID sorts after"


def choose_series(study: Study, rule: SeriesRule) -> SeriesChoice:
    """The series to segment in `study`, by `rule`; InputError naming what the study holds when none is usable."""
    skipped: list[tuple[Series, str]] = []
    candidates: list[Series] = []
    for series in study.series:
        if series.dropped:
            skipped.append((series, series.dropped))
        elif series.slices < rule.min_slices:
            skipped.append((series, f"{series.slices} slice{'s' if series.slices != 1 else ''}, fewer than {rule.min_slices}: no volume"))
        else:
            candidates.append(series)
    overrides = []
    if rule.series_uid is not None:
        overrides.append("--series-uid")
        skipped += [(s, "not the series --series-uid names") for s in candidates if s.series_uid != rule.series_uid]
        candidates = [s for s in candidates if s.series_uid == rule.series_uid]
    if rule.description is not None:
        overrides.append("--series-description")
        pattern = re.compile(rule.description, re.IGNORECASE)
        skipped += [(s, f"its description does not match --series-description {rule.description!r}") for s in candidates
                    if not pattern.search(s.description)]
        candidates = [s for s in candidates if pattern.search(s.description)]
    if not candidates:
        found = "; ".join(f"{s.label()}: {reason}" for s, reason in skipped) or "no DICOM series"
        raise InputError(f"no CT series to segment in this study (found {found})")
    ranked = sorted(candidates, key=lambda s: rank_key(s, rule.target_thickness_mm))
    rule_text = (f"rule: soft-tissue kernel, then slice thickness nearest the model's {rule.target_thickness_mm:g} mm, then most slices, "
                 f"then SeriesInstanceUID")
    selected = f"among the series {' and '.join(overrides)} selected; " if overrides else ""
    if rule.all_series:
        return SeriesChoice(chosen=tuple(ranked), why=f"--all-series: every axial CT series is a case of its own; {selected}{rule_text}",
                            skipped=tuple(skipped))
    chosen = ranked[0]
    if len(ranked) == 1:
        why = f"{selected}the only axial CT series{' left' if overrides or skipped else ''}"
    else:
        why = f"{selected}{rule_text}; the next one, {ranked[1].label()}, ranks after it: {_why_after(chosen, ranked[1], rule.target_thickness_mm)}"
    skipped = [(s, f"ranked after the chosen series: {_why_after(chosen, s, rule.target_thickness_mm)}") for s in ranked[1:]] + skipped
    return SeriesChoice(chosen=(chosen,), why=why, skipped=tuple(skipped))


def short_hash(text: str, length: int = 10) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def name_studies(studies: list[Study], *, root: Path, taken: set[str]) -> dict[str, tuple[str, str]]:
    """Study key -> (case id, where it comes from). Never a patient's name or ID from the headers.

    The study's own folder name when that folder holds no other study and the name is unique (and not in
    `taken`: the image files' case ids); else "study-" and a short SHA-256 of the StudyInstanceUID (of the
    folder's path inside `root` for files without one).
    """
    own: dict[str, str | None] = {}
    for study in studies:
        alone = not any(other is not study and (other.folder == study.folder or study.folder in other.folder.parents) for other in studies)
        own[study.key] = study.folder.name if alone and study.folder.name else None
    counts: dict[str, int] = defaultdict(int)
    for name in own.values():
        if name is not None:
            counts[name] += 1
    names = {}
    for study in studies:
        name = own[study.key]
        if name is not None and counts[name] == 1 and name not in taken:
            names[study.key] = (name, "folder name")
            continue
        why = ("its folder holds other studies" if name is None else "folder names collide")
        if study.study_uid:
            names[study.key] = (f"study-{short_hash(study.study_uid)}", f"hash of the StudyInstanceUID ({why})")
        else:
            relative = os.path.relpath(study.folder, root)
            names[study.key] = (f"study-{short_hash('folder:' + relative)}", f"hash of the folder path, no StudyInstanceUID ({why})")
    return names


def name_series(study_id: str, series: tuple[Series, ...]) -> list[str]:
    """--all-series: each series' case id, the study's id and its SeriesNumber (a short hash of its UID where numbers repeat)."""
    numbers = [s.number for s in series]
    unique = None not in numbers and len(set(numbers)) == len(numbers)
    return [f"{study_id}_s{s.number}" if unique else f"{study_id}_{short_hash(s.series_uid or str(s.files), 8)}" for s in series]
