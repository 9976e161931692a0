"""Time of the evaluation on 100 cases of 512x512x300 with 13 annotated slices each.

    .venv/bin/python benchmarks/bench_evaluation.py [--cases 100] [--distinct 4] [--baseline-cases 3] [--format mha]

Data: `--distinct` different cases are generated (phantom muscles from model/phantom.py on the 13
mid-level slices, stretched along z with a slow drift so slices differ); ground truth keeps the 13
mid-level slices (255 elsewhere), the prediction is dense with boundary errors. The 100 case names are
hard links to these few files: every case is still read and decompressed in full, but the page cache
holds the files (as it would after the first read of a tarball extracted to local disk).

Rows:
- per-case stages (one process, `--distinct` files, repeated): ground-truth read, prediction read as
  the evaluation does it (only annotated slices) vs in full, scoring;
- baseline: the straightforward way (read both volumes in full, a Python loop over labels for Dice on
  the full volume, the reference surface-distance implementation per slice and label), on
  `--baseline-cases` cases, extrapolated to all cases;
- candidate: `python -m evaluation` end to end (with process start, figure, CSV and JSON) on all
  cases, with 1 and with 2 worker processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.labels import canonical_label_set  # noqa: E402
from evaluation.metrics import score_case  # noqa: E402
from evaluation.volumes import read_annotated_slices, read_prediction_slices  # noqa: E402
from common.labels import IGNORE, LEVELS  # noqa: E402
from model.phantom import make_annotated_slices  # noqa: E402

SPACING_MM = (0.8, 0.8, 1.0)


def make_case(seed: int, *, size: int, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(sparse truth, dense prediction), each (n_slices, size, size) uint8."""
    rng = np.random.default_rng(seed)
    _, mids = make_annotated_slices(seed, size_xy=(size, size), pixel_spacing_mm=SPACING_MM[0])
    n_levels = len(LEVELS)
    level_of_slice = np.minimum(np.arange(n_slices) * n_levels // n_slices, n_levels - 1)[::-1]  # cranial levels at the top
    drift = np.cumsum(rng.normal(0, 0.15, (n_slices, 2)), axis=0).round().astype(int)  # slow in-plane drift along z
    dense = np.empty((n_slices, size, size), np.uint8)
    for z in range(n_slices):
        dense[z] = np.roll(mids[level_of_slice[z]], tuple(drift[z]), axis=(0, 1))
    annotated = np.array([int(np.flatnonzero(level_of_slice == level).mean()) for level in range(n_levels)])
    truth = np.full_like(dense, IGNORE)
    truth[annotated] = dense[annotated]
    prediction = np.roll(dense, (0, 1, 1), axis=(0, 1, 2))
    noise = rng.random(dense.shape, dtype=np.float32) < 0.002
    prediction[noise] = 0
    return truth, prediction


def write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_MM)
    sitk.WriteImage(image, str(path), useCompression=True)


def naive_case(truth_path: Path, prediction_path: Path, label_values, tolerance_mm: float) -> None:
    """The straightforward evaluation: full reads, a loop over labels, the reference HD95/NSD per slice and label."""
    import surface_distance

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path)))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_path)))
    annotated = truth != IGNORE
    slices = np.flatnonzero(annotated.any(axis=(1, 2)))
    for value in label_values:
        t, p = (truth == value) & annotated, (prediction == value) & annotated
        _ = 2 * np.count_nonzero(t & p) / max(1, np.count_nonzero(t) + np.count_nonzero(p))
        for s in slices:
            if t[s].any() and p[s].any():
                d = surface_distance.compute_surface_distances(t[s], p[s], SPACING_MM[:2])
                surface_distance.compute_robust_hausdorff(d, 95)
                surface_distance.compute_surface_dice_at_tolerance(d, tolerance_mm)


def timed(function, repeat: int = 1) -> float:
    best = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best.append(time.perf_counter() - started)
    return float(np.median(best))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--distinct", type=int, default=4, help="distinct generated cases (the rest are hard links)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--format", choices=["mha", "nii.gz"], default="mha", help="file format of ground truth and predictions")
    parser.add_argument("--baseline-cases", type=int, default=3, help="cases the naive baseline runs on (0: skip it)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trunkseg-bench-eval-"))
    try:
        started = time.perf_counter()
        truth_dir, prediction_dir = work / "gt", work / "pred"
        truth_dir.mkdir()
        prediction_dir.mkdir()
        distinct = []
        for seed in range(args.distinct):
            truth, prediction = make_case(seed, size=args.size, n_slices=args.slices)
            paths = (work / f"truth-{seed}.{args.format}", work / f"prediction-{seed}.{args.format}")
            write(truth, paths[0])
            write(prediction, paths[1])
            distinct.append(paths)
        for i in range(args.cases):
            truth_path, prediction_path = distinct[i % args.distinct]
            os.link(truth_path, truth_dir / f"case_{i:03d}.{args.format}")
            os.link(prediction_path, prediction_dir / f"case_{i:03d}.{args.format}")
        sizes = [p.stat().st_size / 1e6 for pair in distinct for p in pair]
        print(
            f"# {args.cases} cases of {args.size}x{args.size}x{args.slices} uint8, 13 annotated slices, .{args.format} compressed "
            f"({args.distinct} distinct, files {min(sizes):.2f}-{max(sizes):.2f} MB); generated in {time.perf_counter() - started:.0f} s",
        )
        print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")

        label_set = canonical_label_set()
        rows = []
        truth_s, partial_s, full_s, score_s = [], [], [], []
        for truth_path, prediction_path in distinct:
            truth = read_annotated_slices(truth_path, label_set)
            prediction = read_prediction_slices(prediction_path, truth, label_set, case_id="c")
            truth_s.append(timed(partial(read_annotated_slices, truth_path, label_set), 3))
            partial_s.append(timed(partial(read_prediction_slices, prediction_path, truth, label_set, case_id="c"), 3))
            full_s.append(timed(partial(read_prediction_slices, prediction_path, truth, label_set, case_id="c", strategy="full"), 3))
            score_s.append(timed(partial(score_case, truth.codes_syx, prediction.codes_syx, n_labels=22, spacing_rc_mm=truth.pixel_spacing_mm,
                                         tolerance_mm=2.0, level_of_slice=np.arange(13), n_levels=13), 3))
        per_case = {
            "read ground truth (full, gzip/zlib inflate)": np.median(truth_s),
            "read prediction: whole volume (baseline)": np.median(full_s),
            f"read prediction: annotated slices only ({prediction.read})": np.median(partial_s),
            "score: Dice + HD95 + NSD, 13 slices x 22 muscles": np.median(score_s),
        }
        for name, seconds in per_case.items():
            rows.append((f"per case: {name}", 1, seconds, seconds * args.cases))

        if args.baseline_cases > 0:
            try:
                import surface_distance  # noqa: F401
            except ImportError:
                print("# baseline skipped: surface-distance not installed (requirements/evaluation-test.txt)")
            else:
                n = min(args.baseline_cases, args.cases)
                seconds = timed(lambda: [naive_case(*distinct[i % args.distinct], label_set.values, 2.0) for i in range(n)])
                rows.append(("baseline: full reads, loop over labels, surface-distance per slice and label", n, seconds, seconds / n * args.cases))

        for workers in args.workers:
            output = work / f"out-{workers}"
            command = [sys.executable, "-m", "evaluation", "--predictions", str(prediction_dir), "--ground-truth", str(truth_dir),
                       "--output", str(output), "--workers", str(workers), "--quiet"]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"evaluation failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            size_kb = (output / "metrics.json").stat().st_size / 1024
            rows.append((f"candidate: python -m evaluation, {workers} worker(s) (metrics.json {size_kb:.0f} KiB)", args.cases, seconds, seconds))

        print()
        print("| what | cases run | seconds for the cases run | seconds for all cases |")
        print("|---|---:|---:|---:|")
        for name, n, seconds, total in rows:
            print(f"| {name} | {n} | {seconds:.3f} | {total:.1f} |")
    finally:
        if args.keep:
            print(f"# data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
