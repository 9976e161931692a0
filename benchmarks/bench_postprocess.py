"""Time of the per-case reports on a 512x512x300 CT: measures, levels, CSV, QC picture, DICOM-SEG.

    .venv/bin/python benchmarks/bench_postprocess.py [--slices 300] [--repeat 3]

Data: a phantom's 22 muscles and CT (model/phantom.py, 256x256 at 1.5 mm) upsampled to 512x512 at
0.75 mm and stretched to `--slices` slices (nearest neighbour: real label maps, real HU), with a
TotalSegmentator-style vertebra map (the phantom's bone voxels, valued by level). DICOM-SEG is built
from synthetic single-frame CT headers on the same grid (no pixel data is needed).

Rows: baseline = the previous measures (per-muscle volume and mean HU, one np.bincount), and a naive
per-slice, per-label loop with boolean masks for the same per-slice table; candidate = each stage of
postprocess/ and the whole `write_case_report` (minus file I/O: into memory).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.labels import LABELS, LEVELS, NUM_CLASSES  # noqa: E402
from postprocess.dicom_seg import SourceSeries, build_segmentation, dicom_seg_bytes  # noqa: E402
from postprocess.measures import measure_slices, slice_table_csv, summarise_levels, summarise_muscles  # noqa: E402
from postprocess.qc import png_bytes, render_qc  # noqa: E402
from preprocess.geometry import Geometry  # noqa: E402
from preprocess.vertebrae import LEVEL_ORDER  # noqa: E402
from model.phantom import make_phantom  # noqa: E402


def make_case(n_slices: int):
    phantom = make_phantom(4242, size_xy=(256, 256), spacing_mm=(1.5, 1.5, 3.0))
    z = np.linspace(0, phantom.ct_zyx.shape[0] - 1, n_slices).round().astype(int)
    yx = np.arange(512) // 2
    labels = phantom.labels_zyx[z][:, yx][:, :, yx]
    hu = phantom.ct_zyx[z][:, yx][:, :, yx]
    level = phantom.level_of_slice[z].astype(np.int64)
    names = np.array([LEVEL_ORDER.index(LEVELS[i]) + 1 if i >= 0 else 0 for i in level])
    spine = np.zeros(hu.shape[1:], bool)
    spine[:, 256 - 40 : 256 + 40] = True  # bone within 30 mm of the midline: vertebrae (and the sternum), not the ribs
    vertebrae = np.where((hu > 250) & spine, names[:, None, None], 0).astype(np.uint8)
    geometry = Geometry(size_xyz=(512, 512, n_slices), spacing_mm=(0.75, 0.75, 345.0 / n_slices), origin_mm=(-192.0, -192.0, 0.0),
                        direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return labels, hu, vertebrae, geometry


def headers_for(geometry: Geometry) -> SourceSeries:
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for k in range(geometry.size_xyz[2]):
        h = pydicom.Dataset()
        h.SOPClassUID, h.SOPInstanceUID, h.StudyInstanceUID, h.SeriesInstanceUID, h.FrameOfReferenceUID = CTImageStorage, generate_uid(), study, series, frame
        h.Modality, h.Rows, h.Columns, h.PixelSpacing = "CT", 512, 512, [0.75, 0.75]
        h.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        h.ImagePositionPatient = [geometry.origin_mm[0], geometry.origin_mm[1], geometry.origin_mm[2] + k * geometry.spacing_mm[2]]
        h.SliceThickness = geometry.spacing_mm[2]
        h.PatientID, h.PatientName, h.PatientBirthDate, h.PatientSex, h.StudyDate, h.StudyTime = "bench", "Bench^Case", "", "", "20260101", "000000"
        h.StudyID, h.AccessionNumber, h.ReferringPhysicianName, h.SeriesNumber, h.InstanceNumber = "1", "", "", 1, k + 1
        h.BitsAllocated, h.BitsStored, h.HighBit, h.PixelRepresentation, h.SamplesPerPixel, h.PhotometricInterpretation = 16, 16, 15, 1, 1, "MONOCHROME2"
        headers.append(h)
    return SourceSeries(headers=headers, derived_uids=())


def measure_muscles(labels_zyx: np.ndarray, hu_zyx: np.ndarray, geometry: Geometry) -> dict[str, dict]:
    """The previous measures (baseline): per muscle voxel count, volume (cm3) and mean HU, one bincount over the volume."""
    if labels_zyx.shape != hu_zyx.shape:
        raise ValueError(f"label map {labels_zyx.shape} and CT {hu_zyx.shape} differ in shape")
    n = len(LABELS) + 1
    flat = labels_zyx.ravel()
    counts = np.bincount(flat, minlength=n)[:n]
    sums = np.bincount(flat, weights=hu_zyx.ravel().astype(np.float64), minlength=n)[:n]
    voxel_cm3 = geometry.voxel_volume_mm3 / 1000.0
    return {
        name: {
            "label": value,
            "voxels": int(counts[value]),
            "volume_cm3": round(float(counts[value] * voxel_cm3), 3),
            "mean_hu": round(float(sums[value] / counts[value]), 2) if counts[value] else None,
        }
        for name, value in LABELS.items()
    }


def timed(repeat: int, function):
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def naive_slice_table(labels, hu):
    """The per-slice area/mean/SD table the straightforward way: a boolean mask per slice and label."""
    out = np.zeros((labels.shape[0], NUM_CLASSES, 3))
    for k in range(labels.shape[0]):
        for value in LABELS.values():
            mask = labels[k] == value
            if mask.any():
                h = hu[k][mask].astype(np.float64)
                out[k, value] = mask.sum(), h.mean(), h.std()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    labels, hu, vertebrae, geometry = make_case(args.slices)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; {labels.shape} label map, "
          f"{(labels > 0).mean():.1%} muscle voxels; best of {args.repeat}")
    rows = []
    rows.append(("baseline", "measure_muscles (volume, mean HU per muscle)", *timed(args.repeat, lambda: measure_muscles(labels, hu, geometry))[:1]))
    rows.append(("baseline", "naive per-slice loop (area, mean, SD)", timed(1, lambda: naive_slice_table(labels, hu))[0]))
    t, measures = timed(args.repeat, lambda: measure_slices(labels, hu, geometry, vertebrae_zyx=vertebrae))
    rows.append(("candidate", "measure_slices (+ levels, body centres)", t))
    t_plain, _ = timed(args.repeat, lambda: measure_slices(labels, hu, geometry))
    rows.append(("candidate", "measure_slices without vertebrae", t_plain))
    rows.append(("candidate", "summaries (levels, muscles)", timed(args.repeat, lambda: (summarise_levels(measures), summarise_muscles(measures, geometry)))[0]))
    t, text = timed(args.repeat, lambda: slice_table_csv(measures))
    rows.append(("candidate", f"CSV ({len(text) // 1024} KiB)", t))
    t, picture = timed(args.repeat, lambda: render_qc(labels, hu, measures, title="bench", subtitle="bench"))
    rows.append(("candidate", f"QC render ({picture.width}x{picture.height})", t))
    t, png = timed(args.repeat, lambda: png_bytes(picture))
    rows.append(("candidate", f"QC PNG encode ({len(png) // 1024} KiB)", t))
    source = headers_for(geometry)
    for kind in ("labelmap", "binary"):
        t, data = timed(1, lambda: dicom_seg_bytes(build_segmentation(labels, source, model_identity="bench", software_version="bench", segmentation_type=kind)))
        rows.append(("candidate", f"DICOM-SEG {kind} ({len(data) / 2**20:.1f} MiB)", t))
    print(f"| {'kind':<9} | {'stage':<48} | {'seconds':>8} |")
    print(f"|{'-' * 11}|{'-' * 50}|{'-' * 10}|")
    for kind, stage, seconds in rows:
        print(f"| {kind:<9} | {stage:<48} | {seconds:8.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
