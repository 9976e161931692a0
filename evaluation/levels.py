"""The vertebral level of each annotated slice, from a levels file or a vertebra label volume.

Levels file (CSV or JSON; slice indices count from 0 along the axial axis of the ground-truth file):
- CSV with a header row `case_id,slice_index,level`, one row per slice;
- JSON {"case_id": {"T4": 212, "T5": [190, 191], ...}} (level -> slice index or list of indices).
Vertebra label volume: one per case, named like the case's ground truth, on any grid that overlaps it;
voxel value i (1..13) is the i-th canonical level (T4 .. L4, common/labels.py LEVELS), 0 is no vertebra.
A slice takes the level with most voxels on it; a slice without vertebra voxels has no level.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.errors import CaseError, ConfigError, InputError
from evaluation.volumes import AnnotatedSlices, read_slices_on_truth_grid
from common.labels import LEVELS
from preprocess.vertebrae import majority_per_slice, order_levels  # shared with the algorithm's per-level measures

__all__ = ["LevelTable", "load_level_table", "levels_from_table", "levels_from_volume", "order_levels"]


@dataclass(frozen=True)
class LevelTable:
    """Level name of (case, slice index), read from a levels file."""

    by_case: dict  # case_id -> {slice_index: level}; treat as read-only
    names: tuple[str, ...]  # every level named, cranial to caudal
    source: str


def _slice_index(value, *, path: Path, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"\d+", str(value).strip()):
        raise ConfigError(f"{path}: {where}: slice index {value!r} is not a whole number >= 0")
    return int(str(value).strip())


def load_level_table(path: Path) -> LevelTable:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: levels file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read levels file ({error})") from None
    by_case: dict[str, dict[int, str]] = {}

    def add(case: str, index: int, level: str, where: str) -> None:
        slices = by_case.setdefault(case, {})
        if index in slices and slices[index] != level:
            raise ConfigError(f"{path}: {where}: slice {index} of {case} is given two levels ({slices[index]}, {level})")
        slices[index] = level

    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: levels file is not valid JSON ({error})") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ConfigError(f'{path}: expected {{"case_id": {{"level": slice_index, ...}}, ...}}')
        for case, levels in data.items():
            for level, indices in levels.items():
                for index in indices if isinstance(indices, list) else [indices]:
                    add(str(case), _slice_index(index, path=path, where=f"{case}/{level}"), str(level), f"{case}/{level}")
    else:
        rows = list(csv.DictReader(text.splitlines()))
        needed = {"case_id", "slice_index", "level"}
        if not rows or not needed <= set(rows[0].keys()):
            raise ConfigError(f"{path}: expected a CSV with the header case_id,slice_index,level and at least one row")
        for number, row in enumerate(rows, start=2):
            if not row["case_id"] or not row["level"]:
                raise ConfigError(f"{path}: line {number}: empty case_id or level")
            add(row["case_id"].strip(), _slice_index(row["slice_index"], path=path, where=f"line {number}"), row["level"].strip(), f"line {number}")
    names = order_levels(level for slices in by_case.values() for level in slices.values())
    return LevelTable(by_case=by_case, names=names, source=str(path))


def levels_from_table(table: LevelTable, case_id: str, truth: AnnotatedSlices, names: tuple[str, ...]) -> np.ndarray:
    """Index into `names` of each annotated slice's level (-1 where the table gives none)."""
    slices = table.by_case.get(case_id, {})
    n_axial = truth.geometry.size_xyz[truth.axial_axis_xyz]
    outside = sorted(i for i in slices if i >= n_axial)
    if outside:
        raise CaseError(case_id, f"{table.source} names slice(s) {outside[:5]} but the ground truth has {n_axial} axial slices")
    return np.array([names.index(slices[int(s)]) if int(s) in slices else -1 for s in truth.slice_indices], dtype=np.int64)


def levels_from_volume(path: Path, case_id: str, truth: AnnotatedSlices, names: tuple[str, ...]) -> np.ndarray:
    """Index into `names` of each annotated slice's level, from a vertebra label volume (majority per slice)."""
    found = read_slices_on_truth_grid(path, truth, case_id=case_id, what="vertebra label volume")
    values = found.values_syx
    if not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(np.rint(values), values):
            raise InputError(f"{path}: vertebra label volume holds non-integer values")
        values = values.astype(np.int64)
    if values.min(initial=0) < 0 or values.max(initial=0) > len(LEVELS):
        bad = np.unique(values[(values < 0) | (values > len(LEVELS))])[:10].tolist()
        raise InputError(f"{path}: vertebra label values {bad} are outside 0..{len(LEVELS)} ({LEVELS[0]}..{LEVELS[-1]})")
    best = majority_per_slice(values, len(LEVELS))  # 1..13, 0: no vertebra on the slice
    return np.array([names.index(LEVELS[b - 1]) if b else -1 for b in best], dtype=np.int64)
