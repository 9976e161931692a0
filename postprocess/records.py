"""Per-case records: `results/<case>.json`, written the moment a case's outputs are in place.

A run in the folder layout writes each succeeded case's results.json entry to `results/<case>.json`
(atomically: a temporary `.partial-<case>.json`, then a rename) right after the case's outputs were
renamed into place, so the record exists only when every output of the case does. The run's
results.json is gathered from these entries at its end; a run that is killed keeps its records.

A resumed run (`--skip-existing`) takes a case as done when its record is there, names that case, says
"succeeded", and every file it lists is present; anything else (no record, an unreadable one, a file it
lists is gone) is redone from the start, and the files a killed run left half-written (`.partial-*`)
are removed first. A failed case has no record: a re-run tries it again. One process per output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from common.atomic import PARTIAL_PREFIX, write_json_atomically
from common.errors import OutputError

RECORDS = "results"


def path_of_record(output_dir: Path, case_id: str) -> Path:
    return Path(output_dir) / RECORDS / f"{case_id}.json"


def list_output_paths(record: dict) -> list[str]:
    """The case's files named by its record, relative to the output folder: the mask, then each report (a path, a dict
    with one, or a dict of them such as the viewers' colour tables), each once."""
    paths = [record["output"]] if isinstance(record.get("output"), str) else []
    for value in (record.get("outputs") or {}).values():
        if isinstance(value, str):
            paths.append(value)
        elif isinstance(value, dict) and isinstance(value.get("path"), str):
            paths.append(value["path"])
        elif isinstance(value, dict):
            paths += [v for v in value.values() if isinstance(v, str)]
    return list(dict.fromkeys(paths))


def write_record(output_dir: Path, record: dict) -> Path:
    path = path_of_record(output_dir, record["case_id"])
    write_json_atomically(path, record)
    return path


def forget_record(output_dir: Path, case_id: str) -> None:
    """Before a case is (re)done: an older record of it must not outlive a failure of this attempt."""
    try:
        path_of_record(output_dir, case_id).unlink(missing_ok=True)
    except OSError as error:
        raise OutputError(f"{path_of_record(output_dir, case_id)}: cannot remove ({error.strerror})") from None


def find_complete_record(output_dir: Path, case_id: str) -> dict | None:
    """The case's record when the case is complete in `output_dir` (module docstring), else None."""
    path = path_of_record(output_dir, case_id)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # unreadable: the case is redone and the record rewritten
    if not isinstance(record, dict) or record.get("case_id") != case_id or record.get("status") != "succeeded":
        return None
    files = list_output_paths(record)
    if not files or not all((Path(output_dir) / p).is_file() for p in files):
        return None
    return record


def find_complete_records(output_dir: Path, case_ids: Iterable[str]) -> dict[str, dict]:
    """{case id: record} of the given cases that are complete in `output_dir`."""
    found = {case_id: find_complete_record(output_dir, case_id) for case_id in case_ids}
    return {case_id: record for case_id, record in found.items() if record is not None}


def remove_partial_files(output_dir: Path) -> int:
    """Remove the `.partial-*` files a killed run left anywhere under `output_dir`; how many there were."""
    removed = 0
    for folder, _, files in os.walk(output_dir):
        for name in files:
            if name.startswith(PARTIAL_PREFIX):
                try:
                    (Path(folder) / name).unlink(missing_ok=True)
                except OSError as error:
                    raise OutputError(f"{Path(folder) / name}: cannot remove a half-written file ({error.strerror})") from None
                removed += 1
    return removed
