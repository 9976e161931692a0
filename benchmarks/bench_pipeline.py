"""End-to-end and per-stage time and peak memory of process.py on a 512x512x300 phantom, per runtime.

    .venv/bin/python benchmarks/bench_pipeline.py [--slices 300] [--runtimes onnxruntime torch] [--threads 2]

Each runtime runs the real entry point in its own process (same CT, same weights, same settings), so
peak RSS is that process's own (os.wait4). ONNX Runtime is the candidate, PyTorch eager fp32 the
baseline (OpenVINO, the CPU default, in the precision the model card allows: see bench_cpu_precision.py). Prints a markdown table for docs/benchmarks.md, and the agreement of the masks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.phantom import make_phantom  # noqa: E402


def run_process(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stderr of one process.py run."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(REPO / "process.py"), *args], stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"process.py failed ({child.returncode}):\n{stderr}")
    return wall, usage.ru_maxrss / 1024, stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--spacing", type=float, default=0.8, help="in-plane spacing (mm)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime", "openvino"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trunkseg-bench-"))
    phantom = make_phantom(2024, size_xy=(args.size, args.size), spacing_mm=(args.spacing, args.spacing, 1.0), n_slices=args.slices)
    (work / "in").mkdir()
    sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(phantom.ct_zyx)), str(work / "in" / "bench.mha"), useCompression=True)
    shape = phantom.ct_zyx.shape
    print(f"CT {shape[2]}x{shape[1]}x{shape[0]} at {phantom.geometry.spacing_mm[0]:.2f}x{phantom.geometry.spacing_mm[1]:.2f}x{phantom.geometry.spacing_mm[2]:.2f} mm; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, batch {args.batch_size}", file=sys.stderr)

    rows, masks = [], {}
    for runtime in args.runtimes:
        out = work / f"out-{runtime}"
        wall, peak_mib, _ = run_process(["--input", str(work / "in"), "--output", str(out), "--runtime", runtime,
                                         "--threads", str(args.threads), "--batch-size", str(args.batch_size)])
        case = json.loads((out / "results.json").read_text())["cases"][0]
        t = case["timings_s"]
        masks[runtime] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "muscle-segmentation" / "bench.mha")))
        rows.append((case["runtime"], wall, t, peak_mib))

    header = "| runtime | process wall s | read s | normalise+resample s | network s | blend s | back+argmax s | write s | segment ms/slice | peak RSS MiB |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, wall, t, peak in rows:
        print(f"| {name} | {wall:.1f} | {t['read']:.2f} | {t['segment.normalize_resample']:.2f} | {t['segment.network']:.1f} | {t['segment.blend']:.2f} | "
              f"{t['segment.resample_back_argmax']:.2f} | {t['write']:.2f} | {1000 * t['segment'] / shape[0]:.0f} | {peak:.0f} |")
    if len(masks) > 1:
        names = list(masks)
        agree = np.mean(masks[names[0]] == masks[names[1]])
        print(f"\nvoxel agreement {names[0]} vs {names[1]}: {100 * agree:.4f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
