"""End to end on a 512x512x300 CT: ONNX Runtime on the CPU (baseline) against the GPU runtimes, in one run.

    .venv/bin/python benchmarks/bench_gpu.py [--slices 300] [--threads N] [--rows ort-cpu torch-cuda-fp32 torch-cuda-fp16 tensorrt-fp16]

Each row runs the real entry point (process.py) in its own process on the same CT and weights:
- ort-cpu:         --runtime onnxruntime --precision fp32 (the numpy slice pipeline on the CPU)
- torch-cuda-fp32: --runtime torch --precision fp32 (the device slice pipeline, model/segment_torch.py)
- torch-cuda-fp16: --runtime torch (fp16 autocast, float32 normalisation, CUDA graphs)
- tensorrt-fp16:   --runtime tensorrt (its engine is built once in a warm-up run on one slice, into a
                   temporary engine cache, so the timed run loads it as a deployed image would)
A row that cannot run here prints why (no GPU, no CUDA build of torch, no TensorRT) instead of a number.
Reported: the process's wall time (interpreter start, imports, CUDA and engine start-up included), the
case's own time (read to write), the segmentation stage, and every row's voxel agreement and minimum
per-label Dice against the ort-cpu mask.
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
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.runtimes.gpu import cuda_status, tensorrt_version  # noqa: E402
from model.phantom import make_phantom  # noqa: E402

ROWS = {
    "ort-cpu": (["--runtime", "onnxruntime", "--precision", "fp32"], False, False),
    "torch-cuda-fp32": (["--runtime", "torch", "--precision", "fp32"], True, False),
    "torch-cuda-fp16": (["--runtime", "torch", "--precision", "auto"], True, False),
    "tensorrt-fp16": (["--runtime", "tensorrt", "--precision", "auto"], True, True),
}


def skip_reason(needs_gpu: bool, needs_tensorrt: bool) -> str | None:
    reasons = []
    if needs_gpu:
        status = cuda_status()
        if not status.usable:
            reasons.append(status.description)
    if needs_tensorrt and tensorrt_version() is None:
        reasons.append("TensorRT is not installed")
    return "; ".join(reasons) or None


def run_process(args: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "process.py"), *args], stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"process.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return wall, done.stderr


def dice_min(reference: np.ndarray, got: np.ndarray, min_voxels: int = 100) -> float:
    n = int(max(reference.max(), got.max())) + 1
    a, b = np.bincount(reference.ravel(), minlength=n), np.bincount(got.ravel(), minlength=n)
    both = np.bincount(reference[reference == got].ravel(), minlength=n)
    dice = [2 * both[v] / (a[v] + b[v]) for v in range(1, n) if max(a[v], b[v]) >= min_voxels]
    return float(min(dice)) if dice else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--spacing", type=float, default=0.8, help="in-plane spacing (mm)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trunkseg-bench-gpu-"))
    phantom = make_phantom(2024, size_xy=(args.size, args.size), spacing_mm=(args.spacing, args.spacing, 1.0), n_slices=args.slices)
    (work / "in").mkdir()
    sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(phantom.ct_zyx)), str(work / "in" / "bench.mha"), useCompression=True)
    (work / "warmup").mkdir()
    one_slice = replace(phantom.geometry, size_xyz=(*phantom.geometry.size_xyz[:2], 1))
    sitk.WriteImage(one_slice.apply_to(sitk.GetImageFromArray(phantom.ct_zyx[:1])), str(work / "warmup" / "one.mha"))
    env = {**os.environ, "TRUNKSEG_ENGINE_CACHE": str(work / "engines")}
    status = cuda_status()
    shape = phantom.ct_zyx.shape
    print(f"CT {shape[2]}x{shape[1]}x{shape[0]} at {args.spacing:.2f} mm in-plane; CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {args.threads} threads; GPU: {status.description}; TensorRT: {tensorrt_version() or 'not installed'}",
          file=sys.stderr)

    header = ("| runtime | process wall s | case s | segment s | of which network s | normalise+resample / blend / back+argmax s "
              "| ms/slice | voxel agreement vs ort-cpu | min Dice vs ort-cpu |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    masks: dict[str, np.ndarray] = {}
    for row in args.rows:
        row_args, needs_gpu, needs_tensorrt = ROWS[row]
        reason = skip_reason(needs_gpu, needs_tensorrt)
        if reason is not None:
            lines.append(f"| {row} | skipped: {reason} | | | | | | | |")
            continue
        common = ["--threads", str(args.threads), *row_args]
        if needs_tensorrt:
            run_process(["--input", str(work / "warmup"), "--output", str(work / f"warmup-{row}"), *common], env)
        out = work / f"out-{row}"
        wall, _ = run_process(["--input", str(work / "in"), "--output", str(out), *common], env)
        result = json.loads((out / "results.json").read_text())
        case = result["cases"][0]
        timings = case["timings_s"]
        case_s = sum(v for k, v in timings.items() if "." not in k)
        masks[row] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "muscle-segmentation" / "bench.mha")))
        if "ort-cpu" in masks and row != "ort-cpu":
            agreement = f"{100 * np.mean(masks[row] == masks['ort-cpu']):.4f} %"
            dice = f"{dice_min(masks['ort-cpu'], masks[row]):.4f}"
        else:
            agreement = dice = "(reference)" if row == "ort-cpu" else "n/a"
        name = f"{row} ({result['runtime']['name']})"
        stages = " / ".join(f"{timings.get(f'segment.{k}', float('nan')):.2f}" for k in ("normalize_resample", "blend", "resample_back_argmax"))
        lines.append(f"| {name} | {wall:.1f} | {case_s:.2f} | {timings['segment']:.2f} | {timings.get('segment.network', float('nan')):.2f} | {stages} "
                     f"| {1000 * timings['segment'] / shape[0]:.0f} | {agreement} | {dice} |")
    print("\n".join(lines))
    print(f"load average during the run: {' '.join(f'{v:.1f}' for v in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
