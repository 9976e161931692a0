"""The one canonical label table, read from labels.json beside this file.

Everything (pipeline, phantom, evaluation, reports) takes label names and values from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

_TABLE = json.loads((Path(__file__).with_name("labels.json")).read_text())

BACKGROUND: int = int(_TABLE["background"])
IGNORE: int = int(_TABLE["ignore"])
#: muscle name -> voxel value, in label order (1..22)
LABELS: MappingProxyType = MappingProxyType(
    dict(sorted(((str(k), int(v)) for k, v in _TABLE["labels"].items()), key=lambda kv: kv[1]))
)
#: voxel value -> muscle name
NAMES: MappingProxyType = MappingProxyType({v: k for k, v in LABELS.items()})
#: vertebral levels annotated in the published method, cranial to caudal
LEVELS: tuple[str, ...] = tuple(_TABLE["levels"])
NUM_CLASSES: int = len(LABELS) + 1  # with background


def mirror_label(value: int) -> int:
    """Return the label of the same muscle on the other side (right <-> left)."""
    name = NAMES[value]
    if name.endswith("_right"):
        return LABELS[name[: -len("_right")] + "_left"]
    return LABELS[name[: -len("_left")] + "_right"]


def _check_table() -> None:
    values = sorted(LABELS.values())
    if values != list(range(1, len(values) + 1)):
        raise ValueError(f"{Path(__file__).with_name('labels.json')}: label values must be 1..N, got {values}")
    if IGNORE in values or BACKGROUND in values:
        raise ValueError("labels.json: ignore/background collide with a muscle label")


_check_table()
