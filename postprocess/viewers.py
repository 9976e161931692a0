"""Label names and colours in the files the common viewers read, the colours of postprocess/colours.py.

- 3D Slicer colour table (`.ctbl`, Slicer's "Color table file" text format, read by every Slicer version:
  slicer.readthedocs.io, developer guide, Colors): a `# Color table file` header, `# N values`, then one
  line per label `value name R G B A` (0-255; names without spaces), background 0 transparent. Load it,
  then the mask as a label map volume with this colour table (Add data > Show options > LabelMap).
- ITK-SNAP label description file (ITK-SNAP's Segmentation > Import Label Descriptions): `#` comment
  lines, then one line per label `IDX R G B A VIS MSH "LABEL"` with A the opacity 0..1, VIS and MSH 0/1.

Both list the 22 canonical labels (common/labels.json) and the background; a label absent from a mask
keeps its colour, so that one table serves every case.
"""

from __future__ import annotations

from common.labels import LABELS
from postprocess.colours import COLOURS

SLICER_TABLE_NAME = "trunk-muscles.ctbl"
ITKSNAP_TABLE_NAME = "trunk-muscles.itksnap.txt"


def slicer_colour_table() -> str:
    lines = ["# Color table file trunk-muscles (trunkseg; label values of common/labels.json)", f"# {len(LABELS) + 1} values",
             "0 background 0 0 0 0"]
    lines += [f"{value} {name} {' '.join(str(c) for c in COLOURS[name])} 255" for name, value in sorted(LABELS.items(), key=lambda item: item[1])]
    return "\n".join(lines) + "\n"


def itksnap_label_description() -> str:
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# trunkseg trunk muscles (label values of common/labels.json)",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "################################################",
        f"{0:5d} {0:5d} {0:4d} {0:4d} {0:8.2f} {0:2d} {0:2d}    \"Clear Label\"",
    ]
    for name, value in sorted(LABELS.items(), key=lambda item: item[1]):
        r, g, b = COLOURS[name]
        lines.append(f"{value:5d} {r:5d} {g:4d} {b:4d} {1:8.2f} {1:2d} {1:2d}    \"{name}\"")
    return "\n".join(lines) + "\n"


#: file name -> its text, as the report writes them (outside Grand Challenge's layout)
def viewer_files() -> dict[str, str]:
    return {SLICER_TABLE_NAME: slicer_colour_table(), ITKSNAP_TABLE_NAME: itksnap_label_description()}
