"""Which label values are scored, under which names, and which value marks unannotated voxels.

A labels file is JSON in one of four shapes:
- the product's own table (common/labels.json): {"labels": {name: value}, "ignore": 255, ...};
- an nnU-Net v2 dataset.json: {"labels": {"background": 0, name: value, ..., "ignore": N}, ...};
- a flat map {name: value};
- Grand Challenge's overlay segments (a segmentation socket's list): [{"name": ..., "voxel_value": ..., "visible": ...}, ...]
  (an entry of voxel value 0 is the background; such a list names no ignore value).
"background" (must be 0) is dropped; "ignore" (inside "labels" as nnU-Net writes it, or at the top
level) names the ignore value. Region-based nnU-Net labels (lists of values) are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evaluation.errors import ConfigError
from common import labels as canonical

DEFAULT_IGNORE = 255
CANONICAL_SOURCE = "common/labels.json"


@dataclass(frozen=True)
class LabelSet:
    """Scored labels in value order, and the ignore value (None: the labels file names none)."""

    names: tuple[str, ...]
    values: tuple[int, ...]
    ignore: int | None
    source: str

    @property
    def max_value(self) -> int:
        return max(self.values)

    def name_of(self, value: int) -> str:
        return self.names[self.values.index(value)]


def canonical_label_set() -> LabelSet:
    """The 22 canonical muscles of common/labels.py, ignore value 255."""
    return LabelSet(
        names=tuple(canonical.LABELS.keys()),
        values=tuple(canonical.LABELS.values()),
        ignore=canonical.IGNORE,
        source=CANONICAL_SOURCE,
    )


def _as_label_value(value, *, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, list):
            raise ConfigError(f"{path}: label {name!r} is region-based ({value}); only one value per label is supported")
        raise ConfigError(f"{path}: label {name!r} has value {value!r}, expected an integer")
    if not 0 <= value <= 65535:
        raise ConfigError(f"{path}: label {name!r} has value {value}, expected 0..65535")
    return value


def _overlay_segments(entries: list, path: Path) -> dict:
    """Grand Challenge's overlay segments as the product's table {"labels": {name: value}} (voxel value 0 named "background")."""
    table: dict = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "voxel_value" not in entry:
            raise ConfigError(f"{path}: overlay segment {index} must be an object with 'name' and 'voxel_value'")
        name = str(entry["name"])
        value = _as_label_value(entry["voxel_value"], name=name, path=path)
        if value == 0:
            name = "background"
        if name in table:
            raise ConfigError(f"{path}: overlay segment name {name!r} is used twice")
        table[name] = value
    return {"labels": table}


def load_label_set(path: Path) -> LabelSet:
    """Read a labels file (product table, nnU-Net dataset.json, flat map or overlay segments); see the module docstring."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read labels file ({error})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: labels file is not valid JSON ({error})") from None
    if isinstance(data, list):
        data = _overlay_segments(data, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: labels file must hold a JSON object, or Grand Challenge's list of overlay segments")
    table = data.get("labels", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'labels' must be an object of name -> value")
    ignore = None
    pairs: list[tuple[str, int]] = []
    for name, value in table.items():
        if name == "ignore":
            ignore = _as_label_value(value, name=name, path=path)
        elif name == "background":
            if _as_label_value(value, name=name, path=path) != 0:
                raise ConfigError(f"{path}: 'background' must be 0, got {value}")
        else:
            pairs.append((str(name), _as_label_value(value, name=name, path=path)))
    if "labels" in data and "ignore" in data and not isinstance(data["ignore"], dict):
        top = _as_label_value(data["ignore"], name="ignore", path=path)
        if ignore is not None and ignore != top:
            raise ConfigError(f"{path}: two different ignore values ({ignore} in 'labels', {top} at the top level)")
        ignore = top
    if not pairs:
        raise ConfigError(f"{path}: labels file names no labels")
    pairs.sort(key=lambda pair: pair[1])
    values = [value for _, value in pairs]
    if 0 in values:
        raise ConfigError(f"{path}: value 0 is background and cannot be a scored label ({pairs[values.index(0)][0]!r})")
    if len(set(values)) != len(values):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        raise ConfigError(f"{path}: label values used twice: {duplicates}")
    if ignore is not None and ignore in values:
        raise ConfigError(f"{path}: ignore value {ignore} is also a label value")
    return LabelSet(names=tuple(n for n, _ in pairs), values=tuple(values), ignore=ignore, source=str(path))


def with_ignore(label_set: LabelSet, ignore: int) -> LabelSet:
    """The same labels with an explicit ignore value (from the command line)."""
    if ignore in label_set.values:
        raise ConfigError(f"ignore value {ignore} is also a label value in {label_set.source}")
    if ignore == 0:
        raise ConfigError("ignore value 0 is background")
    return LabelSet(names=label_set.names, values=label_set.values, ignore=ignore, source=label_set.source)
