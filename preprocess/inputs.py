"""Find the cases in an input folder: Grand Challenge's layout or a plain folder of CTs.

- Grand Challenge: /input/inputs.json (when present) names the image sockets; the CT lies under
  /input/<relative_path>/ as exactly one image file (<image-pk>.mha) or a DICOM series (<SOPInstanceUID>.dcm).
  Without inputs.json, /input/images/<slug>/ must hold exactly one socket folder (or pass `slug`).
- A plain folder: every CT file (.mha/.mhd/.nii/.nii.gz/.nrrd/.nhdr) and every sub-folder (a DICOM
  series) is one case. A folder holding DICOM files directly is one case.

Paths from inputs.json must stay inside the input folder (no traversal, no symlinks out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import InputError
from preprocess.io import case_id, is_image_file

IMAGE_KINDS = {"Image", "DICOM Image Set"}


@dataclass(frozen=True)
class Case:
    case_id: str
    source: Path  # an image file or a DICOM series folder
    vertebrae: Path | None = None  # a vertebra label map given with the CT (Grand Challenge: its own socket)


@dataclass(frozen=True)
class CaseList:
    layout: str  # "grand-challenge" or "folder"
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


def find_cases(input_dir: Path, *, slug: str | None = None, vertebrae_slug: str | None = None) -> CaseList:
    """The cases; with `vertebrae_slug`, Grand Challenge's socket of that slug (when present) is the vertebra label map."""
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(f"{root}: input folder does not exist")
    inputs_json = root / "inputs.json"
    if inputs_json.is_file():
        sockets = []
        for entry in _read_inputs_json(inputs_json):
            interface = entry.get("interface") if isinstance(entry, dict) else None
            if not isinstance(interface, dict):
                raise InputError(f"{inputs_json}: an entry has no 'interface' object")
            if interface.get("kind") in IMAGE_KINDS or interface.get("super_kind") == "Image":
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
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        raise InputError(f"{root}: input folder is empty")
    images = [p for p in entries if is_image_file(p)]
    series = [p for p in entries if p.is_dir()]
    if not images and not series:
        return CaseList("folder", (Case(root.name, root),))  # DICOM files directly in the folder
    cases = tuple(Case(case_id(p), p) for p in images) + tuple(Case(p.name, p) for p in series)
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"{root}: several inputs share the case name(s) {', '.join(duplicates)}")
    return CaseList("folder", cases)


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
