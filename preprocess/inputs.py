"""Find the cases of an input: Grand Challenge's layout, one image file, or a folder, DICOMDIR or tree of CTs and DICOM studies.

- Grand Challenge: /input/inputs.json (when present) names the image sockets; the CT lies under
  /input/<relative_path>/ as exactly one image file (<image-pk>.mha) or a DICOM series (<SOPInstanceUID>.dcm).
  Without inputs.json, /input/images/<slug>/ must hold exactly one socket folder (or pass `slug`).
- One image file (.mha/.mhd/.nii/.nii.gz/.nrrd/.nhdr): one case, named after the file.
- A folder (a tree of any depth), a DICOMDIR, or a single DICOM file: every image file is a case (named after
  the file; the path inside the folder where names repeat), and every DICOM study (StudyInstanceUID) is a
  case whose CT series preprocess/study.py chooses (with --all-series, each axial CT series). A study
  is named after its own folder, else a short hash of its StudyInstanceUID (preprocess/study.py); never
  after a patient's name or ID. A .zip is unpacked first (preprocess/archive.py).

Paths from inputs.json must stay inside the input folder (no traversal, no symlinks out).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from preprocess.dicom import DicomSeries, UnusableStudy
from common.errors import InputError
from preprocess.io import case_id, is_image_file
from preprocess.study import SeriesRule, choose_series, group_studies, name_series, name_studies, scan_headers

IMAGE_KINDS = {"Image", "DICOM Image Set"}


@dataclass(frozen=True)
class Case:
    case_id: str
    source: Path | DicomSeries | UnusableStudy  # an image file, a DICOM series folder, the series a study chose, or a study without one
    vertebrae: Path | None = None  # a vertebra label map given with the CT (Grand Challenge: its own socket)
    id_from: str | None = None  # where the case id comes from (results.json "case_id_from"); None: Grand Challenge's socket
    selection: dict | None = field(default=None, compare=False)  # a study's series: the chosen one, why, and the others' reasons


@dataclass(frozen=True)
class CaseList:
    layout: str  # "grand-challenge", "folder", "file" or "dicomdir"
    cases: tuple[Case, ...]


def _inside(root: Path, path: Path, what: str) -> Path:
    try:
        resolved = path.resolve()
    except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, a symlink loop
        raise InputError(f"{what}: cannot resolve {str(path)!r} ({error})") from None
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise InputError(f"{what}: {path} points outside the input folder {root}")
    return resolved


def _case_in_socket(root: Path, folder: Path) -> Case:
    """The one CT of a socket folder: one image file, or the folder itself as a DICOM series."""
    if not folder.is_dir():
        raise InputError(f"{folder}: input socket folder is missing")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for entry in entries:
        _inside(root, entry, str(folder))
    images = [p for p in entries if is_image_file(p)]
    if len(images) > 1:
        raise InputError(f"{folder}: holds {len(images)} images ({', '.join(p.name for p in images[:4])}); expected exactly one")
    if len(images) == 1:
        return Case(case_id(images[0]), images[0])
    if not entries:
        raise InputError(f"{folder}: input socket folder is empty")
    return Case(folder.name, folder)  # a DICOM image set


def _read_inputs_json(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of socket values, got {type(data).__name__}")
    return data


def _vertebrae_in_socket(root: Path, folder: Path) -> Path:
    """The one image file of the vertebra label socket."""
    case = _case_in_socket(root, folder)
    if case.source.is_dir():
        raise InputError(f"{folder}: the vertebra label socket must hold one image file, not a DICOM series")
    return case.source


def _image_case_ids(images: list[Path], root: Path) -> list[tuple[str, str]]:
    """(case id, where it comes from) of each image file: its name, or its path inside `root` where names repeat."""
    names = [case_id(p) for p in images]
    ids = []
    for path, name in zip(images, names):
        if names.count(name) == 1:
            ids.append((name, "file name"))
        else:
            relative = path.relative_to(root)
            ids.append(("_".join((*relative.parts[:-1], case_id(relative))), "file path (file names repeat)"))
    return ids


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `root`, any depth, hidden names skipped; symbolic links followed, each folder once."""
    images, others = [], []
    seen: set[Path] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:  # a link back to a folder already walked (a loop, or two links to one folder)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or not path.is_file():
                continue
            (images if is_image_file(path) else others).append(path)
    return images, others


def _dicomdir_files(path: Path) -> list[Path]:
    """The files a DICOMDIR references (pydicom's FileSet), each inside the DICOMDIR's folder."""
    from pydicom.fileset import FileSet

    try:
        fileset = FileSet(path)
        files = [Path(instance.path) for instance in fileset]
    except Exception as error:  # pydicom's errors on a malformed DICOMDIR are no closed set
        raise InputError(f"{path}: not a readable DICOMDIR ({type(error).__name__}: {' '.join(str(error).split())[:160]})") from None
    for file in files:
        _inside(path.parent, file, str(path))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{path}: references {len(missing)} missing file(s), e.g. {missing[0]}")
    return sorted(files)


def cases_of_files(root: Path, images: list[Path], others: list[Path], *, rule: SeriesRule, layout: str) -> CaseList:
    """The cases of some image files and of the DICOM studies among `others` (names relative to `root`)."""
    image_ids = _image_case_ids(images, root)
    cases = [Case(name, path, id_from=source) for path, (name, source) in zip(images, image_ids)]
    studies = group_studies(scan_headers(others)) if others else []
    if rule.series_uid is not None:
        studies = [s for s in studies if any(series.series_uid == rule.series_uid for series in s.series)]
        if not studies:
            raise InputError(f"{root}: no series with SeriesInstanceUID {rule.series_uid} (--series-uid)")
    if not cases and not studies:
        if others:
            raise InputError(f"{root}: no CT image slices found (no DICOM file among its {len(others)} file(s), and no image file)")
        raise InputError(f"{root}: input folder is empty")
    names = name_studies(studies, root=root, taken={name for name, _ in image_ids})
    for study in studies:
        name, source = names[study.key]
        try:
            choice = choose_series(study, rule)
        except InputError as error:
            cases.append(Case(name, UnusableStudy(study.folder, str(error)), id_from=source))
            continue
        ids = name_series(name, choice.chosen) if rule.all_series else [name]
        for series, series_name in zip(choice.chosen, ids):
            selection = {"study_instance_uid": study.study_uid or None, **choice.report(series)}
            cases.append(Case(series_name, DicomSeries(study.folder, series.files, series.series_uid), id_from=source, selection=selection))
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"{root}: several inputs share the case name(s) {', '.join(duplicates)}")
    return CaseList(layout, tuple(sorted(cases, key=lambda c: c.case_id)))


def _cases_of_path(path: Path, rule: SeriesRule) -> CaseList:
    """One image file, a DICOMDIR, or a single DICOM file given as --input."""
    if is_image_file(path):
        return CaseList("file", (Case(case_id(path), path, id_from="file name"),))
    if path.name.upper() == "DICOMDIR":
        return cases_of_files(path.parent, [], _dicomdir_files(path), rule=rule, layout="dicomdir")
    return cases_of_files(path.parent, [], [path], rule=rule, layout="file")


def find_cases(input_dir: Path, *, slug: str | None = None, vertebrae_slug: str | None = None, rule: SeriesRule = SeriesRule()) -> CaseList:
    """The cases; with `vertebrae_slug`, Grand Challenge's socket of that slug (when present) is the vertebra label map.

    `rule` chooses the series of DICOM studies outside Grand Challenge's layout (preprocess/study.py).
    """
    root = Path(input_dir)
    if root.is_file():
        return _cases_of_path(root, rule)
    if not root.is_dir():
        raise InputError(f"{root}: input does not exist (no such file or folder)")
    inputs_json = root / "inputs.json"
    if inputs_json.is_file():
        sockets = []
        for entry in _read_inputs_json(inputs_json):
            interface = entry.get("interface") if isinstance(entry, dict) else None
            if not isinstance(interface, dict):
                raise InputError(f"{inputs_json}: an entry has no 'interface' object")
            kind = interface.get("kind")
            if (isinstance(kind, str) and kind in IMAGE_KINDS) or interface.get("super_kind") == "Image":  # a list is no kind (fuzzing)
                sockets.append(interface)
        vertebra_sockets = [s for s in sockets if vertebrae_slug is not None and s.get("slug") == vertebrae_slug]
        sockets = [s for s in sockets if s not in vertebra_sockets]
        if slug is not None:
            sockets = [s for s in sockets if s.get("slug") == slug]
        if len(sockets) != 1:
            names = ", ".join(str(s.get("slug")) for s in sockets) or "none"
            raise InputError(f"{inputs_json}: expected exactly one CT image input{f' with slug {slug!r}' if slug else ''}, found {names}")
        relative = sockets[0].get("relative_path")
        if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
            raise InputError(f"{inputs_json}: image input has no usable relative_path ({relative!r})")
        folder = _inside(root, root / relative, str(inputs_json))
        case = _case_in_socket(root, folder)
        if vertebra_sockets:
            relative = vertebra_sockets[0].get("relative_path")
            if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
                raise InputError(f"{inputs_json}: vertebra label input has no usable relative_path ({relative!r})")
            case = Case(case.case_id, case.source, _vertebrae_in_socket(root, _inside(root, root / relative, str(inputs_json))))
        return CaseList("grand-challenge", (case,))
    images_dir = root / "images"
    if images_dir.is_dir():
        sockets = sorted(p for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        vertebra_folders = [p for p in sockets if vertebrae_slug is not None and p.name == vertebrae_slug]
        sockets = [p for p in sockets if p not in vertebra_folders]
        if slug is not None:
            sockets = [p for p in sockets if p.name == slug]
        if len(sockets) != 1:
            names = ", ".join(p.name for p in sockets) or "none"
            raise InputError(f"{images_dir}: expected one image socket folder without inputs.json, found {names}")
        case = _case_in_socket(root, sockets[0])
        if vertebra_folders:
            case = Case(case.case_id, case.source, _vertebrae_in_socket(root, vertebra_folders[0]))
        return CaseList("grand-challenge", (case,))
    images, others = _walk(root)
    return cases_of_files(root, images, others, rule=rule, layout="folder")


def vertebrae_maps(path: Path | None, cases) -> dict[str, Path]:
    """--vertebrae: one file for the one case, or a folder of <case_id>.<image suffix> files (a case without one has no levels)."""
    if path is None:
        return {}
    if path.is_file():
        if len(cases) != 1:
            raise InputError(f"{path}: one vertebra label map given for {len(cases)} cases; give a folder of <case>.<ext> files")
        return {cases[0].case_id: path}
    if not path.is_dir():
        raise InputError(f"{path}: vertebra label map not found")
    files = {case_id(p): p for p in sorted(path.iterdir()) if is_image_file(p)}
    return {c.case_id: files[c.case_id] for c in cases if c.case_id in files}
