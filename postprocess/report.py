"""Everything a case writes besides its mask: measures (results.json part + CSV), QC picture, DICOM-SEG, NIfTI.

Paths, relative to the output folder (see docs/outputs.md):
- measures/<case>.csv                 per-slice table (postprocess/measures.py)
- qc/<case>.png, or `qc_path`         QC picture; in Grand Challenge's layout `qc_path` is the Thumbnail PNG
                                      socket's relative_path (default muscle-qc.png, at the output root)
- dicom-seg/<case>.dcm                when the input was a DICOM series
- viewers/trunk-muscles.ctbl, viewers/trunk-muscles.itksnap.txt   with `viewer_files=True` (outside Grand Challenge's
                                      layout): the colour table for 3D Slicer and ITK-SNAP (postprocess/viewers.py)
- nifti/<case>.nii.gz                 with `nifti=True`
All are staged in the caller's StagedOutputs, so a failure leaves none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postprocess.dicom_seg import SEGMENTATION_TYPES, build_segmentation, dicom_seg_bytes, read_source_series
from postprocess.measures import FAT_THRESHOLD_HU, measure_slices, slice_table_csv, summarise_levels, summarise_muscles
from postprocess.outputs import StagedOutputs
from postprocess.qc import png_bytes, render_qc
from postprocess.viewers import ITKSNAP_TABLE_NAME, SLICER_TABLE_NAME, viewer_files
from preprocess.dicom import DicomSeries
from preprocess.geometry import Geometry
from preprocess.io import write_label_map
from preprocess.vertebrae import SCHEMES, read_vertebrae


#: --format: the mask file's format -> its suffix (SimpleITK picks the writer by it; all compressed)
MASK_FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "mha": ".mha", "nrrd": ".nrrd"}


@dataclass(frozen=True)
class ReportOptions:
    vertebra_scheme: str = "totalsegmentator"
    nifti: bool = False
    dicom_seg: bool = True
    dicom_seg_type: str = "binary"  # docs/inputs.md "DICOM-SEG": binary opens in every SEG viewer; labelmap (2024) in few yet
    qc_path: str | None = None  # relative to the output folder; None: qc/<case>.png
    mask_format: str = "auto"  # the mask file's format (MASK_FORMATS); auto: the input's family (mask_suffix)
    viewer_files: bool = False  # write the viewers' colour tables (outside Grand Challenge's layout)

    def __post_init__(self):
        if self.vertebra_scheme not in SCHEMES:
            raise ValueError(f"vertebra scheme {self.vertebra_scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.dicom_seg_type not in SEGMENTATION_TYPES:
            raise ValueError(f"DICOM-SEG type {self.dicom_seg_type!r} is not one of {', '.join(SEGMENTATION_TYPES)}")
        if self.mask_format != "auto" and self.mask_format not in MASK_FORMATS:
            raise ValueError(f"mask format {self.mask_format!r} is not auto or one of {', '.join(MASK_FORMATS)}")


def is_dicom(source) -> bool:
    """A DICOM series (chosen in a study, or a series folder): its case gets a DICOM-SEG."""
    return isinstance(source, DicomSeries) or (isinstance(source, (str, os.PathLike)) and Path(source).is_dir())


def mask_suffix(source, options: ReportOptions) -> str:
    """The mask file's suffix: --format, else the input's family (NIfTI -> .nii.gz, NRRD -> .nrrd, DICOM -> .nii.gz, MetaImage -> .mha)."""
    if options.mask_format != "auto":
        return MASK_FORMATS[options.mask_format]
    if is_dicom(source):
        return ".nii.gz"
    name = Path(source).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return ".nii.gz"
    if name.endswith((".nrrd", ".nhdr")):
        return ".nrrd"
    return ".mha"


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

    if options.dicom_seg and is_dicom(source):
        series = read_source_series(source)
        segmentation = build_segmentation(labels_zyx, series, model_identity=model_identity, software_version=software_version,
                                          segmentation_type=options.dicom_seg_type)
        seg_path = Path("dicom-seg") / f"{case_id}.dcm"
        staged.write_bytes(output_dir / seg_path, dicom_seg_bytes(segmentation))
        outputs["dicom_seg"] = {"path": str(seg_path), "type": options.dicom_seg_type, "sop_instance_uid": str(segmentation.SOPInstanceUID),
                                "references_series": str(series.headers[0].SeriesInstanceUID), "derived_source_uids": list(series.derived_uids)}
    if options.viewer_files:  # the same text for every case: a later case rewrites them unchanged
        for name, text in viewer_files().items():
            staged.write_text(output_dir / "viewers" / name, text)
        outputs["viewer_colour_tables"] = {"3d_slicer": f"viewers/{SLICER_TABLE_NAME}", "itk_snap": f"viewers/{ITKSNAP_TABLE_NAME}"}
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
