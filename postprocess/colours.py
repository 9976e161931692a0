"""The one colour table of the muscles, used by the QC picture and the DICOM-SEG segments.

Eleven hues, one per muscle (Sasha Trubetskoy's "20 distinct colours", chosen so that neighbours differ:
the obliques, latissimus and serratus; erector spinae, transversospinalis, quadratus lumborum and psoas).
The patient's right side has the full colour, the left side the same hue mixed 45 % with white, so that a
side swap is as visible as a wrong muscle. docs/outputs.md lists the table.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from common.labels import LABELS

#: muscle (without side) -> RGB of its right side
BASE_RGB = MappingProxyType({
    "pectoralis_major": (230, 25, 75),
    "rectus_abdominis": (60, 180, 75),
    "serratus_anterior": (255, 225, 25),
    "latissimus_dorsi": (0, 130, 200),
    "trapezius": (245, 130, 48),
    "external_oblique": (145, 30, 180),
    "internal_oblique": (70, 240, 240),
    "erector_spinae": (240, 50, 230),
    "transversospinalis": (210, 245, 60),
    "psoas_major": (170, 110, 40),
    "quadratus_lumborum": (0, 128, 128),
})
LEFT_WHITE_MIX = 0.45


def _side_colour(name: str) -> tuple[int, int, int]:
    muscle, side = name.rsplit("_", 1)
    rgb = BASE_RGB[muscle]
    if side == "right":
        return rgb
    return tuple(int(round(c + (255 - c) * LEFT_WHITE_MIX)) for c in rgb)


#: canonical label name -> RGB (0..255)
COLOURS = MappingProxyType({name: _side_colour(name) for name in LABELS})


def colour_lookup_table() -> np.ndarray:
    """(NUM_CLASSES, 3) uint8 array: row = label value, background black."""
    table = np.zeros((max(LABELS.values()) + 1, 3), dtype=np.uint8)
    for name, value in LABELS.items():
        table[value] = COLOURS[name]
    return table
