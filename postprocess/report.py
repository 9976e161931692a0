"""Everything a case writes besides its mask: measures (results.json part + CSV), QC picture, DICOM-SEG, NIfTI.

Paths, relative to the output folder (see docs/outputs.md):
- measures/<case>.csv                 per-slice table (postprocess/measures.py)
- qc/<case>.png, or `qc_path`         QC picture; in Grand Challenge's layout `qc_path` is the Thumbnail PNG
                                      socket's relative_path (default muscle-qc.png, at the output root)
- dicom-seg/<case>.dcm                when the input was a DICOM series
- nifti/<case>.nii.gz                 with `nifti=True`
All are staged in the caller's StagedOutputs, so a failure leaves none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postprocess.dicom_seg import SEGMENTATION_TYPES, build_segmentation, dicom_seg_bytes, read_source_series
from postprocess.measures import FAT_THRESHOLD_HU, measure_slices, slice_table_csv, summarise_levels, summarise_muscles
from postprocess.outputs import StagedOutputs
from postprocess.qc import png_bytes, render_qc
from preprocess.geometry import Geometry
from preprocess.io import write_label_map
from preprocess.vertebrae import SCHEMES, read_vertebrae


@dataclass(frozen=True)
class ReportOptions:
    vertebra_scheme: str = "totalsegmentator"
    nifti: bool = False
    dicom_seg: bool = True
    dicom_seg_type: str = "labelmap"
    qc_path: str | None = None  # relative to the output folder; None: qc/<case>.png

    def __post_init__(self):
        if self.vertebra_scheme not in SCHEMES:
            raise ValueError(f"vertebra scheme {self.vertebra_scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.dicom_seg_type not in SEGMENTATION_TYPES:
            raise ValueError(f"DICOM-SEG type {self.dicom_seg_type!r} is not one of {', '.join(SEGMENTATION_TYPES)}")


def load_vertebrae(path: Path | None, geometry: Geometry, options: ReportOptions) -> np.ndarray | None:
    """The vertebra map on the CT grid (read before segmenting, so that a bad one fails the case at once), or None."""
    return None if path is None else read_vertebrae(path, geometry, scheme=options.vertebra_scheme)


def write_case_report(*, case_id: str, labels_zyx: np.ndarray, hu_zyx: np.ndarray, geometry: Geometry, source: Path,
                      vertebrae: Path | None, vertebrae_zyx: np.ndarray | None, options: ReportOptions, output_dir: Path,
                      staged: StagedOutputs, model_identity: str, software_version: str) -> dict:
    """Stage the case's reports and return its results.json entries ("muscles", "levels", "outputs").

    `vertebrae_zyx` is `load_vertebrae(vertebrae, ...)`; `vertebrae` only names its file.
    """
    output_dir = Path(output_dir)
    if vertebrae_zyx is not None:
        levels_info = {"available": True, "source": str(vertebrae), "scheme": options.vertebra_scheme,
                       "method": "each axial slice takes the vertebra with most voxels on it (map resampled onto the CT grid, nearest neighbour)"}
    else:
        levels_info = {"available": False, "reason": "no vertebra label map given with this CT: per-slice measures only"}
    measures = measure_slices(labels_zyx, hu_zyx, geometry, vertebrae_zyx=vertebrae_zyx)
    per_level = summarise_levels(measures) if vertebrae_zyx is not None else {}
    if vertebrae_zyx is not None:
        levels_info["levels_found"] = list(per_level)
        levels_info["per_level"] = per_level

    outputs = {}
    csv_path = Path("measures") / f"{case_id}.csv"
    staged.write_text(output_dir / csv_path, slice_table_csv(measures))
    outputs["measures_csv"] = str(csv_path)

    level_note = (f"levels from {Path(vertebrae).name} ({options.vertebra_scheme} scheme): mid-slice of each level" if vertebrae_zyx is not None
                  else "no vertebra labels: evenly spaced slices")
    picture = render_qc(labels_zyx, hu_zyx, measures, title=f"{case_id}  ·  trunk muscles",
                        subtitle=f"{level_note}  ·  model {model_identity}  ·  trunkseg {software_version}")
    qc_path = Path(options.qc_path) if options.qc_path else Path("qc") / f"{case_id}.png"
    staged.write_bytes(output_dir / qc_path, png_bytes(picture))
    outputs["qc_png"] = str(qc_path)

    if options.dicom_seg and Path(source).is_dir():
        series = read_source_series(Path(source))
        segmentation = build_segmentation(labels_zyx, series, model_identity=model_identity, software_version=software_version,
                                          segmentation_type=options.dicom_seg_type)
        seg_path = Path("dicom-seg") / f"{case_id}.dcm"
        staged.write_bytes(output_dir / seg_path, dicom_seg_bytes(segmentation))
        outputs["dicom_seg"] = {"path": str(seg_path), "type": options.dicom_seg_type, "sop_instance_uid": str(segmentation.SOPInstanceUID),
                                "references_series": str(series.headers[0].SeriesInstanceUID), "derived_source_uids": list(series.derived_uids)}
    if options.nifti:
        nifti_path = Path("nifti") / f"{case_id}.nii.gz"
        write_label_map(labels_zyx, geometry, staged.path_for(output_dir / nifti_path))
        outputs["nifti"] = str(nifti_path)
    return {
        "muscles": summarise_muscles(measures, geometry),
        "levels": levels_info,
        "measure_definitions": {"fat_fraction": f"fraction of the muscle's voxels below {FAT_THRESHOLD_HU:g} HU",
                                "sd_hu": "population SD (ddof=0)",
                                "anterior_mm / lateral_mm": "muscle centroid minus vertebral body centre; + anterior; + towards the muscle's own side"},
        "outputs": outputs,
    }
