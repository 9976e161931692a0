"""What choosing a study's series costs before the first case: header scanning, grouping and the rule.

    .venv/bin/python benchmarks/bench_study_scan.py [--series 6] [--slices 100] [--repeats 3]

Writes a study of SERIES series of SLICES slices each, copies of the real DICOM sample's files (their JPEG 2000
pixel data kept, so each file has its real size, about 157 kB) with new UIDs, into a temporary folder, then
times, on the same files (the OS cache warm after a first untimed pass):
- baseline: preprocess.dicom.list_ct_slices on one series folder (what a one-series-per-folder run read
  before this change), per file;
- candidate: preprocess.study's scan_headers + group_studies + choose_series over the whole study, per file.
Prints a table: rows per step, ms per file (median of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from preprocess.dicom import list_ct_slices  # noqa: E402
from preprocess.study import SeriesRule, choose_series, group_studies, scan_headers  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "totalsegmentator-example" / "example_ct_dicom"


def write_study(folder: Path, *, series: int, slices: int) -> list[Path]:
    sources = sorted(SAMPLE.iterdir())
    study = generate_uid()
    kernels = ["Br38f", "Br64f", "Br38f", "Br38f", "Bl57d", "Qr40d"]
    for s in range(series):
        series_uid = generate_uid()
        target = folder / f"series-{s}"
        target.mkdir(parents=True)
        for i in range(slices):
            ds = pydicom.dcmread(sources[i % len(sources)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series_uid, s + 1
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ConvolutionKernel = kernels[s % len(kernels)]
            position = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [position[0], position[1], -1000.0 + 3.0 * i]
            ds.save_as(target / f"IM{i:05d}")
    return sorted(p for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        files = write_study(Path(temp), series=args.series, slices=args.slices)
        one_series = Path(temp) / "series-0"
        list_ct_slices(one_series), scan_headers(files)  # warm the OS cache
        baseline, candidate = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            list_ct_slices(one_series)
            baseline.append((time.perf_counter() - started) / args.slices)
            started = time.perf_counter()
            studies = group_studies(scan_headers(files))
            choice = choose_series(studies[0], SeriesRule(target_thickness_mm=1.5))
            candidate.append((time.perf_counter() - started) / len(files))
        print(f"study of {args.series} series x {args.slices} slices ({len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB), "
              f"chosen: series {choice.chosen[0].number} ({choice.chosen[0].kernel}); median of {args.repeats}")
        print(f"{'step':<62} {'ms/file':>8}")
        print(f"{'baseline: list_ct_slices, one series folder':<62} {1000 * statistics.median(baseline):8.2f}")
        print(f"{'candidate: scan_headers + group_studies + choose_series, study':<62} {1000 * statistics.median(candidate):8.2f}")


if __name__ == "__main__":
    main()
