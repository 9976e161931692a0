"""Which prediction goes with which ground truth: Grand Challenge's predictions.json, or files paired by name.

Case id: a file's name without its image suffix (preprocess.io.case_id). A mapping file in the
ground-truth folder (mapping.json or mapping.csv) renames predictions whose names differ from the
ground truth's; names it does not list pair as they are. See evaluation/README.md for the formats.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from evaluation.errors import ConfigError, InputError
from preprocess.io import IMAGE_SUFFIXES, case_id, is_image_file

MAPPING_NAMES = ("mapping.json", "mapping.csv")


@dataclass(frozen=True)
class CaseInput:
    case_id: str
    truth_path: Path
    prediction_path: Path | None  # None: no prediction (an error unless --allow-missing)
    job_pk: str | None = None
    image_name: str | None = None


@dataclass(frozen=True)
class Pairing:
    cases: tuple[CaseInput, ...]  # sorted by case id
    missing: tuple[str, ...]  # case ids with ground truth but no prediction
    notes: tuple[str, ...]  # things a person should know (skipped jobs)


def list_images(folder: Path, *, what: str) -> dict[str, Path]:
    """Image files directly in `folder` by case id; two files with one case id are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not is_image_file(path):
            continue
        name = case_id(path)
        if name in found:
            raise InputError(f"{folder}: duplicate case name {name!r} ({found[name].name} and {path.name})")
        found[name] = path
    return found


def find_mapping_file(truth_dir: Path) -> Path | None:
    present = [Path(truth_dir) / name for name in MAPPING_NAMES if (Path(truth_dir) / name).is_file()]
    if len(present) > 1:
        raise ConfigError(f"{truth_dir}: both mapping.json and mapping.csv present; keep one")
    return present[0] if present else None


def load_mapping(path: Path) -> dict[str, str]:
    """Mapping file: JSON {"name or image pk": "ground-truth case id or file name"}, or CSV with header name,case_id."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read mapping file ({error})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: mapping file is not valid JSON ({error})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
            raise ConfigError(f'{path}: expected a JSON object {{"prediction or image name": "ground-truth case id"}}')
        pairs = list(data.items())
    else:
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or not {"name", "case_id"} <= set(rows[0].keys()):
            raise ConfigError(f"{path}: expected a CSV with the header name,case_id and at least one row")
        pairs = [(row["name"].strip(), (row["case_id"] or "").strip()) for row in rows]
        empty = [number for number, (k, v) in enumerate(pairs, start=2) if not k or not v]
        if empty:
            raise ConfigError(f"{path}: line {empty[0]}: empty name or case_id")
    mapping: dict[str, str] = {}
    for key, value in pairs:
        if key in mapping and mapping[key] != case_id(Path(value)):
            raise ConfigError(f"{path}: {key!r} is mapped twice")
        mapping[key] = case_id(Path(value))
    return mapping


def _check_mapping_targets(mapping: dict[str, str], truths: dict[str, Path], source: Path | None) -> None:
    unknown = sorted({v for v in mapping.values() if v not in truths})
    if unknown:
        raise ConfigError(f"{source}: maps to case ids with no ground truth: {', '.join(unknown[:10])}")


def _lookup(mapping: dict[str, str], *keys: str | None) -> str | None:
    for key in keys:
        if key is not None and key in mapping:
            return mapping[key]
    return None


def _finish(pairs: list[CaseInput], truths: dict[str, Path], notes: list[str]) -> Pairing:
    by_case: dict[str, CaseInput] = {}
    for pair in pairs:
        if pair.case_id in by_case:
            first = by_case[pair.case_id]
            raise InputError(
                f"duplicate case name {pair.case_id!r}: two predictions pair with {truths[pair.case_id]} "
                f"({first.job_pk or first.prediction_path} and {pair.job_pk or pair.prediction_path})"
            )
        by_case[pair.case_id] = pair
    missing = tuple(sorted(set(truths) - set(by_case)))
    cases = [by_case.get(name, CaseInput(case_id=name, truth_path=truths[name], prediction_path=None)) for name in sorted(truths)]
    return Pairing(cases=tuple(cases), missing=missing, notes=tuple(notes))


def pair_local(predictions_dir: Path, truth_dir: Path, *, mapping_path: Path | None) -> Pairing:
    """Pair prediction files with ground-truth files by case id (after the mapping file, if any)."""
    truths = list_images(truth_dir, what="ground-truth")
    if not truths:
        raise InputError(f"{truth_dir}: no ground-truth images ({', '.join(IMAGE_SUFFIXES)})")
    predictions = list_images(predictions_dir, what="predictions")
    if not predictions:
        hint = ""
        nested = sorted(p for p in Path(predictions_dir).glob("images/*") if p.is_dir())
        if nested:
            hint = f" (an algorithm output folder? try --predictions {nested[0]})"
        raise InputError(f"{predictions_dir}: no prediction images ({', '.join(IMAGE_SUFFIXES)}){hint}")
    mapping = load_mapping(mapping_path) if mapping_path else {}
    _check_mapping_targets(mapping, truths, mapping_path)
    pairs, unmatched = [], []
    for name, path in predictions.items():
        target = _lookup(mapping, path.name, name) or name
        if target not in truths:
            unmatched.append(path.name)
            continue
        pairs.append(CaseInput(case_id=target, truth_path=truths[target], prediction_path=path))
    if unmatched:
        raise InputError(
            f"{predictions_dir}: {len(unmatched)} prediction(s) with no ground truth in {truth_dir}: {', '.join(unmatched[:10])}"
            + (" (add them to a mapping file)" if not mapping_path else f" (not in {mapping_path.name} either)")
        )
    return _finish(pairs, truths, [])


def _socket_value(values, slug: str, *, job: str, where: str) -> dict:
    if not isinstance(values, list):
        raise InputError(f"predictions.json: job {job}: '{where}' is not a list")
    matches = [v for v in values if isinstance(v, dict) and isinstance(v.get("interface"), dict) and v["interface"].get("slug") == slug]
    if len(matches) != 1:
        slugs = sorted(str(v.get("interface", {}).get("slug")) for v in values if isinstance(v, dict) and isinstance(v.get("interface"), dict))
        what = "no" if not matches else f"{len(matches)}"
        raise InputError(f"predictions.json: job {job} has {what} {where} with slug {slug!r} (found: {', '.join(slugs) or 'none'})")
    return matches[0]


def _safe_part(value, *, job: str, what: str) -> str:
    text = str(value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text:
        raise InputError(f"predictions.json: job {job}: unusable {what} {text!r}")
    return text


def _single_image(folder: Path, *, job: str) -> Path:
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder of job {job} not found")
    images = [p for p in sorted(folder.iterdir()) if is_image_file(p)]
    if len(images) != 1:
        raise InputError(f"{folder}: expected exactly one image for job {job}, found {len(images)}" + (f" ({', '.join(p.name for p in images[:5])})" if images else ""))
    return images[0]


def read_predictions_json(path: Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found (is this a Grand Challenge evaluation input folder?)")
    try:
        jobs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({error})") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(jobs, list):
        raise InputError(f"{path}: expected a list of algorithm jobs, got {type(jobs).__name__}")
    if not jobs:
        raise InputError(f"{path}: lists no algorithm jobs")
    return jobs


def pair_grand_challenge(input_dir: Path, truth_dir: Path, *, input_slug: str, output_slug: str, mapping_path: Path | None) -> Pairing:
    """Pair each job of /input/predictions.json with a ground truth through its input image's name (or pk)."""
    input_dir = Path(input_dir)
    jobs = read_predictions_json(input_dir / "predictions.json")
    truths = list_images(truth_dir, what="ground-truth")
    if not truths:
        raise InputError(f"{truth_dir}: no ground-truth images ({', '.join(IMAGE_SUFFIXES)})")
    mapping = load_mapping(mapping_path) if mapping_path else {}
    _check_mapping_targets(mapping, truths, mapping_path)
    pairs, notes, seen_pks = [], [], set()
    for number, job in enumerate(jobs):
        if not isinstance(job, dict) or "pk" not in job:
            raise InputError(f"predictions.json: entry {number} is not a job with a 'pk'")
        pk = _safe_part(job["pk"], job=f"#{number}", what="job pk")
        if pk in seen_pks:
            raise InputError(f"predictions.json: job {pk} is listed twice")
        seen_pks.add(pk)
        status = job.get("status", "Succeeded")
        if status != "Succeeded":
            notes.append(f"job {pk} has status {status!r}: not scored")
            continue
        source = _socket_value(job.get("inputs"), input_slug, job=pk, where="input")
        image = source.get("image") if isinstance(source.get("image"), dict) else {}
        image_name, image_pk = image.get("name"), image.get("pk")
        if not image_name and not image_pk:
            raise InputError(f"predictions.json: job {pk}: input {input_slug!r} has no image name or pk")
        image_pk = str(image_pk) if image_pk else None
        keys = [k for k in (image_name, case_id(Path(image_name)) if image_name else None, image_pk) if k]
        target = _lookup(mapping, *keys)
        if target is None:
            candidates = {k for k in keys[1:] if k in truths}
            if len(candidates) > 1:
                raise InputError(f"predictions.json: job {pk}: both {sorted(candidates)} have ground truth; say which in a mapping file")
            target = candidates.pop() if candidates else None
        if target is None:
            raise InputError(
                f"predictions.json: job {pk}: no ground truth for input image {image_name!r} (pk {image_pk}) in {truth_dir}"
                + (" (add it to a mapping file)" if not mapping_path else f" (not in {mapping_path.name} either)")
            )
        output = _socket_value(job.get("outputs"), output_slug, job=pk, where="output")
        relative = str(output.get("interface", {}).get("relative_path") or "")
        if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise InputError(f"predictions.json: job {pk}: output {output_slug!r} has an unusable relative_path {relative!r}")
        prediction = _single_image(input_dir / pk / "output" / relative, job=pk)
        pairs.append(CaseInput(case_id=target, truth_path=truths[target], prediction_path=prediction, job_pk=pk, image_name=image_name))
    return _finish(pairs, truths, notes)
