"""The GPU path, measured, in one short run (issue 18): everything the one GPU call must bring back.

    python3 benchmarks/gpu_session.py --out DIR                       # on the GPU machine (< 8 min on an H200)
    .venv/bin/python benchmarks/gpu_session.py --rehearse --out DIR   # here: the same code on the CPU device, tiny CT and network
    .venv/bin/python benchmarks/gpu_session.py --stage-deps           # copy dynamic_network_architectures to .gpu-deps/ to carry along

Steps, in this order, each made of rows (one failing row is recorded with its exception and the run goes on):
1. environment: nvidia-smi, the GPU (name, compute capability, memory), driver, torch and its CUDA and cuDNN, the
   Python packages this path needs and those it must do without (SimpleITK, pydicom, openvino: absent there);
2. pytest: the `gpu`-marked tests of tests/test_gpu_segment.py, test_gpu_runtime.py and test_tensorrt.py in a
   subprocess with its own timeout (TensorRT's skip saying why); the summary goes into the JSON, all of it to pytest.log;
3. agreement: fp16 (and fp32) on the device against ONNX Runtime fp32 on the CPU, voxel agreement and per-label
   Dice against docs/gpu.md's bar (every label with >= 100 voxels at Dice >= 0.99), for the demo package and the
   paper-sized network (benchmarks/paper_network.py, seeded random weights: its near-ties make it a stress test). ONNX
   Runtime fp32 on the CPU is slow for the paper network at 512x512, so this runs on a seeded subset of the CT's slices;
4. timings: a 512x512x300 CT at 0.7 mm (model/phantom.py, arrays, no files) end to end through the device pipeline
   (model/segment_torch.py) for both networks, fp32 / fp16 / fp16 + CUDA graphs at batch 1, 8 and 32: a cold run
   (cuDNN autotuning, graph capture) then timed runs; wall time, the pipeline's own CUDA-event stage times (network,
   normalise+resample, blend, back+argmax), what is left of the wall time (host staging, waits), peak GPU memory
   (reset per row), and the host<->device copies of the same CT and labels measured on their own (the pipeline
   overlaps them with compute, so they are not a stage of its clock).

Output, in --out: session.json (rewritten after every row, so a run cut short keeps what it measured), report.md (the
tables) and pytest.log. Exit status: 0 when no row failed, 1 when one did (a missed fidelity bar is a finding, printed
and recorded, not a failure). --budget-s: rows that would start after it are recorded as skipped for time.

--rehearse runs the very same code on the CPU device with a 64x64x6 CT and a small network of the paper's family:
TorchCudaRunner is constructed as on the GPU, then a CPU stand-in runs its network (float32; fp16 gets the float32
normalisation islands, but no autocast and no CUDA graphs); CUDA events, pinned copies and peak memory become wall
clocks, plain copies and None; torch and ONNX Runtime use one thread. It blocks SimpleITK, pydicom, highdicom,
openvino and atheris as the GPU machine lacks them (sys.modules[name] = None: importing fails,
importlib.util.find_spec says None, here and in the pytest subprocess); --block-imports NAME... blocks others,
`--block-imports` with no name none.

dynamic_network_architectures (the networks' code) is not installed on the GPU machine: --stage-deps copies the
installed distribution (pure Python, about 0.3 MB) to .gpu-deps/ (git-ignored); carry that folder along, and --deps
(default .gpu-deps) puts it first on the path, here and in the pytest subprocess.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib.util
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEPS = REPO / ".gpu-deps"
#: not installed on the GPU machine; --rehearse blocks them here so that an import of one fails as it would there
MISSING_THERE = ("SimpleITK", "pydicom", "highdicom", "openvino", "atheris")
#: pure-Python distributions the GPU machine lacks and this path needs (--stage-deps)
STAGED_DISTRIBUTIONS = ("dynamic_network_architectures",)
REPORTED_MODULES = ("numpy", "scipy", "torch", "onnx", "onnxruntime", "safetensors", "pytest", "dynamic_network_architectures",
                    "tensorrt", "tensorrt_bindings", *MISSING_THERE)
GPU_TEST_FILES = ("tests/test_gpu_segment.py", "tests/test_gpu_runtime.py", "tests/test_tensorrt.py")
PYTEST_LAUNCHER = ("import sys; sys.modules.update({name: None for name in sys.argv[1].split(',') if name}); "
                   "import pytest; sys.exit(pytest.main(sys.argv[2:]))")
DEMO_PACKAGE = REPO / "model" / "packages" / "demo-phantom"
PRECISION_ROWS = (("fp32", False), ("fp16", False), ("fp16", True))  # (precision, CUDA graphs)
BATCH_SIZES = (1, 8, 32)
CT_SEED = 2026
SUBSET_SEED = 18


@dataclass(frozen=True)
class Sizes:
    """What one mode runs: the CT, the paper network's family, the agreement subsets, the repeats."""

    ct_size_yx: tuple[int, int]
    ct_slices: int
    ct_spacing_mm: float
    paper_features: tuple[int, ...] | None  # None: the paper's own (benchmarks/paper_network.py)
    paper_tile_yx: tuple[int, int] | None
    agreement_slices: dict
    min_voxels_for_dice: int
    repeats: int
    pytest_timeout_s: float
    margin_slices: int = 8  # slices of the fp16/fp32 margin diagnosis


GPU_SIZES = Sizes((512, 512), 300, 0.7, None, None, {"paper": 24, "demo": 24}, 100, 2, 150.0)
REHEARSAL_SIZES = Sizes((64, 64), 6, 0.7, (4, 8, 16), (64, 64), {"paper": 4, "demo": 4}, 1, 1, 120.0, margin_slices=3)


# --- the session: rows, the budget, the files ----------------------------------------------------------------------

class Session:
    """The JSON of the run, rewritten (with report.md) after every row; rows that fail or run out of time are recorded."""

    def __init__(self, out_dir: Path, *, budget_s: float, meta: dict):
        self.out_dir = out_dir
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.data = {**meta, "budget_s": budget_s, "finished": False, "elapsed_s": 0.0, "steps": {}}

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def step(self, name: str, note: str = "") -> dict:
        step = self.data["steps"].setdefault(name, {"note": note, "rows": []})
        self.save()
        return step

    def run_row(self, step_name: str, row_name: str, measure: Callable[[], dict], *, needs_budget: bool = True) -> dict | None:
        """Run one row: its dict of results, or None where it failed (exception recorded) or was skipped for time."""
        rows = self.data["steps"][step_name]["rows"]
        if needs_budget and self.left_s() <= 0:
            rows.append({"name": row_name, "status": "skipped", "reason": f"time budget of {self.budget_s:.0f} s used up"})
            print(f"[{step_name}] {row_name}: skipped (time budget used up)", flush=True)
            self.save()
            return None
        print(f"[{step_name}] {row_name} ...", flush=True)
        started = time.perf_counter()
        try:
            result = measure()
        except Exception as error:  # any failure of one row: recorded, and the run goes on with the next
            rows.append({"name": row_name, "status": "failed", "error": f"{type(error).__name__}: {error}"[:2000],
                         "traceback": traceback.format_exc()[-4000:], "seconds": round(time.perf_counter() - started, 2)})
            print(f"[{step_name}] {row_name}: FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
            release_device_memory()
            self.save()
            return None
        row = {"name": row_name, "status": "ok", "seconds": round(time.perf_counter() - started, 2), **result}
        rows.append(row)
        print(f"[{step_name}] {row_name}: ok in {row['seconds']:.1f} s{summary_of(row)}", flush=True)
        self.save()
        return row

    def failed_rows(self) -> list[str]:
        return [f"{step}/{row['name']}" for step, body in self.data["steps"].items() for row in body["rows"] if row["status"] == "failed"]

    def save(self, *, finished: bool = False) -> None:
        from common.atomic import write_json_atomically, write_text_atomically

        self.data["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.data["finished"] = finished
        self.data["failed_rows"] = self.failed_rows()
        write_json_atomically(self.out_dir / "session.json", json_ready(self.data))
        try:
            report = format_report(self.data)
        except Exception as error:  # the tables are a convenience: never a reason to lose the run (the JSON has it all)
            report = f"report.md could not be formatted ({type(error).__name__}: {error}); session.json has every result\n"
        write_text_atomically(self.out_dir / "report.md", report)


def json_ready(value):
    """`value` with numpy scalars as Python numbers, NaN or infinity as None (the JSON writer refuses them), anything else as text."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def summary_of(row: dict) -> str:
    keys = ("wall_s", "ms_per_slice", "network_s", "peak_gib", "voxel_agreement", "min_dice", "meets_bar", "summary")
    parts = [f"{k} {row[k]:.4g}" if isinstance(row.get(k), float) else f"{k} {row[k]}" for k in keys if row.get(k) is not None]
    return f" ({', '.join(parts)})" if parts else ""


# --- imports: what the GPU machine lacks, and what is carried to it ------------------------------------------------

def block_imports(names: list[str]) -> None:
    """Make `names` unimportable in this process as if not installed (import fails, find_spec is None)."""
    for name in names:
        if sys.modules.get(name) is not None:
            raise SystemExit(f"{name} is already imported: cannot block it")
        sys.modules[name] = None


def use_deps(deps_dir: Path) -> str | None:
    """Put a staged folder of pure-Python distributions first on the path (this process and its children); its path or None."""
    if not deps_dir.is_dir():
        return None
    sys.path.insert(0, str(deps_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(deps_dir), os.environ.get("PYTHONPATH", "")) if p)
    return str(deps_dir)


def stage_deps(target: Path) -> int:
    """Copy the installed STAGED_DISTRIBUTIONS (their files and metadata, no bytecode) under `target`; bytes copied."""
    from importlib.metadata import distribution

    copied = 0
    for name in STAGED_DISTRIBUTIONS:
        dist = distribution(name)
        for file in dist.files or ():
            if "__pycache__" in file.parts or file.suffix == ".pyc" or ".." in file.parts:
                continue
            source = Path(dist.locate_file(file))
            if source.is_file():
                (target / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / file)
                copied += source.stat().st_size
    return copied


def describe_modules() -> dict:
    """Each module of REPORTED_MODULES: its version and where it comes from, or 'absent'."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in REPORTED_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            found[name] = "absent"
            continue
        try:
            found[name] = f"{version(name)} ({spec.origin})"
        except PackageNotFoundError:
            found[name] = f"version unknown ({spec.origin})"
    return found


# --- the device: clocks, memory, a CPU stand-in for TorchCudaRunner ------------------------------------------------

def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


@contextmanager
def device_clock(device, into: dict, key: str):
    """Seconds of the enclosed work under `key`: CUDA events on the current stream (synchronised at the end), else wall time."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        into[key] = start.elapsed_time(end) / 1000.0
    else:
        started = time.perf_counter()
        yield
        into[key] = time.perf_counter() - started


class CpuStandIn:
    """--rehearse only: TorchCudaRunner's network on the CPU device, float32 (fp16: the float32 normalisation islands too,
    no autocast), no CUDA graphs, behind the same `run_device` and context manager."""

    def __init__(self, runner):
        self.runner = runner  # the real TorchCudaRunner, constructed with the GPU run's arguments
        self.name = f"{runner.name} (CPU stand-in: float32, no CUDA graphs)"
        self.network = None

    def __enter__(self) -> "CpuStandIn":
        from model.network import load_package_network
        from model.runtimes.cuda import float32_norms

        network = load_package_network(self.runner.package)
        if self.runner.precision == "fp16":
            float32_norms(network)
        self.network = network.eval()
        return self

    def __exit__(self, *exc) -> None:
        self.network = None

    def run_device(self, batch):
        import torch

        with torch.inference_mode():
            return self.network(batch)


def open_device_runner(package, *, precision: str, cuda_graphs: bool, device):
    """TorchCudaRunner on CUDA; on the CPU device (--rehearse) the same runner behind CpuStandIn."""
    from model.runtimes.cuda import TorchCudaRunner

    runner = TorchCudaRunner(package, precision=precision, cuda_graphs=cuda_graphs, device=str(device))
    return runner if device.type == "cuda" else CpuStandIn(runner)


# --- the steps -----------------------------------------------------------------------------------------------------

def describe_environment(*, device, blocked: list[str], deps: str | None) -> dict:
    import torch

    from model.runtimes.cuda import nvidia_driver_version
    from model.runtimes.gpu import cuda_status, tensorrt_version

    smi = shutil.which("nvidia-smi")
    if smi is None:
        smi_text = "nvidia-smi not found"
    else:
        done = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv"],
                               capture_output=True, text=True, timeout=30)
        smi_text = (done.stdout + done.stderr + "\n" + query.stdout + query.stderr).strip()
    info = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)), "device": str(device),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(), "cuda_status": cuda_status().description, "driver": nvidia_driver_version(),
        "tensorrt": tensorrt_version() or "not installed", "modules": describe_modules(), "blocked_imports": blocked,
        "deps_dir": deps, "nvidia_smi": smi_text, "git_commit": git_commit(),
        "TRUNKSEG_CUDA_GRAPHS": os.environ.get("TRUNKSEG_CUDA_GRAPHS"), "TRUNKSEG_CUDNN_BENCHMARK": os.environ.get("TRUNKSEG_CUDNN_BENCHMARK"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        info.update(gpu=torch.cuda.get_device_name(0), compute_capability=f"{major}.{minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    missing = [name for name in STAGED_DISTRIBUTIONS if info["modules"][name] == "absent"]
    if missing:  # every network of this path is built by it: say how to bring it, first thing
        print(f"MISSING: {', '.join(missing)}: stage it here with `benchmarks/gpu_session.py --stage-deps` and carry .gpu-deps", flush=True)
    info["summary"] = (f"{'MISSING ' + ', '.join(missing) + '; ' if missing else ''}{info.get('gpu', 'no GPU')} "
                       f"(sm {info.get('compute_capability')}), driver {info['driver']}, torch {info['torch']}, "
                       f"CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}, TensorRT {info['tensorrt']}")
    return info


def git_commit() -> str | None:
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30)
    return (done.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")) if done.returncode == 0 else None


def run_gpu_tests(*, out_dir: Path, blocked: list[str], timeout_s: float) -> dict:
    """The gpu-marked tests in a subprocess (as the GPU machine's Python sees the tree); raises where they did not pass."""
    args = ["-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # no third-party plugin of that image
    log = out_dir / "pytest.log"
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", PYTEST_LAUNCHER, ",".join(blocked), *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        log.write_text(output + f"\n[killed after {timeout_s:.0f} s]\n")
        raise TimeoutError(f"pytest did not finish in {timeout_s:.0f} s (its output so far: pytest.log)") from None
    log.write_text(output)
    lines = output.strip().splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\b(passed|failed|skipped|error|errors|deselected)\b", line)), "")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary)}
    result = {"returncode": code, "summary": summary, "counts": counts, "seconds_pytest": round(time.perf_counter() - started, 1),
              "skip_reasons": [line for line in lines if line.startswith("SKIPPED")], "tail": "\n".join(lines[-40:])}
    if code != 0:
        raise RuntimeError(f"pytest exit status {code}: {summary or 'no summary'} (pytest.log)\n" + "\n".join(lines[-25:]))
    return result


def make_ct(sizes: Sizes, *, into: dict) -> dict:
    """The phantom CT (arrays, no file) as into["ct"]: volume_zyx, pixel_spacing_mm, slice_spacing_mm; its description."""
    from model.phantom import make_phantom

    spacing = sizes.ct_spacing_mm
    phantom = make_phantom(CT_SEED, size_xy=sizes.ct_size_yx[::-1], spacing_mm=(spacing, spacing, 1.0), n_slices=sizes.ct_slices)
    into["ct"] = {"volume_zyx": phantom.ct_zyx, "pixel_spacing_mm": (spacing, spacing), "slice_spacing_mm": float(phantom.geometry.spacing_mm[2])}
    return {"shape_zyx": list(phantom.ct_zyx.shape), "dtype": str(phantom.ct_zyx.dtype), "pixel_spacing_mm": spacing,
            "slice_spacing_mm": into["ct"]["slice_spacing_mm"], "seed": CT_SEED}


def make_packages(sizes: Sizes, work: Path, *, into: dict) -> dict:
    """into["paper"] and into["demo"]: the paper-sized package (seeded random weights; the rehearsal's smaller member of
    its family) and the demo package; their descriptions."""
    from benchmarks.paper_network import paper_package
    from model.package import load_model_package

    extra = {} if sizes.paper_features is None else {"features_per_stage": sizes.paper_features, "tile_size": sizes.paper_tile_yx}
    into["paper"] = load_model_package(paper_package(work / "paper", spacing_mm=sizes.ct_spacing_mm, **extra))
    into["demo"] = load_model_package(DEMO_PACKAGE)
    return {name: describe_package(into[name]) for name in ("paper", "demo")}


def describe_package(package) -> dict:
    card = package.card
    return {"name": card.name, "tile_yx": list(card.tile_size), "pixel_spacing_mm": list(card.pixel_spacing_mm),
            "classes": card.num_classes, "parameters": card.provenance.get("parameters") if card.provenance else None}


def pick_subset(n_slices: int, count: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(SUBSET_SEED)
    return sorted(int(i) for i in rng.choice(n_slices, size=min(count, n_slices), replace=False))


def segment_reference(package, ct: dict, slices: list[int], *, threads: int) -> dict:
    """ONNX Runtime fp32 on the CPU (the numpy segmenter) on the chosen slices: the agreement's reference."""
    import numpy as np

    from model.runtimes.cpu import OnnxRuntimeRunner
    from model.segment import segment_volume

    volume = np.ascontiguousarray(ct["volume_zyx"][slices])
    started = time.perf_counter()
    with OnnxRuntimeRunner(package, threads=threads) as runner:
        labels = segment_volume(volume, pixel_spacing_mm=ct["pixel_spacing_mm"], card=package.card, network=runner,
                                batch_size=runner.preferred_batch_size, slice_spacing_mm=ct["slice_spacing_mm"])
    return {"volume_zyx": volume, "labels": labels, "seconds": time.perf_counter() - started}


def measure_agreement(package, ct: dict, reference: dict, *, precision: str, device, min_voxels: int) -> dict:
    """One device precision (CUDA graphs on, the product's default) against the ONNX Runtime fp32 labels."""
    import numpy as np

    from model.precision import MIN_DICE, dice_per_label
    from model.segment_torch import segment_volume_device

    started = time.perf_counter()
    with open_device_runner(package, precision=precision, cuda_graphs=True, device=device) as runner:
        labels = segment_volume_device(reference["volume_zyx"], pixel_spacing_mm=ct["pixel_spacing_mm"], card=package.card,
                                       network=runner.run_device, device=device, batch_size=8, slice_spacing_mm=ct["slice_spacing_mm"])
    seconds = time.perf_counter() - started
    dice = dice_per_label(reference["labels"], labels, min_voxels=min_voxels)
    below = {label: round(value, 5) for label, value in dice.items() if value < MIN_DICE}
    min_dice = min(dice.values()) if dice else None
    return {"runner": runner.name, "device_s": round(seconds, 2), "ort_fp32_cpu_s": round(reference["seconds"], 2),
            "slices": len(labels), "voxel_agreement": float(np.mean(labels == reference["labels"])),
            "min_dice": min_dice, "labels_compared": len(dice), "labels_below_bar": below,
            "dice_per_label": {label: round(value, 5) for label, value in dice.items()},
            "meets_bar": (not below) if dice else None, "bar": f"per-label Dice >= {MIN_DICE} (labels with >= {min_voxels} voxels)"}


def measure_transfers(volume_zyx, *, device) -> dict:
    """The CT up and its labels down, on their own: pageable and pinned uploads, pinning, the pinned download."""
    import torch

    cuda = device.type == "cuda"
    host = torch.from_numpy(volume_zyx)
    seconds: dict = {}
    started = time.perf_counter()
    pinned = host.pin_memory() if cuda else host.clone()
    seconds["pin_s"] = time.perf_counter() - started
    with device_clock(device, seconds, "h2d_pageable_s"):
        on_device = host.to(device)
    with device_clock(device, seconds, "h2d_pinned_s"):
        on_device = pinned.to(device, non_blocking=cuda)
    labels = torch.zeros(on_device.shape, dtype=torch.uint8, device=device)
    back = torch.empty(labels.shape, dtype=torch.uint8, pin_memory=cuda)
    with device_clock(device, seconds, "d2h_pinned_s"):
        back.copy_(labels, non_blocking=cuda)
    ct_gb, labels_gb = host.numel() * host.element_size() / 1e9, labels.numel() / 1e9
    del on_device, labels, back, pinned
    release_device_memory()
    rates = {f"{k[:-2]}_gb_per_s": round((labels_gb if k.startswith("d2h") else ct_gb) / v, 2) for k, v in seconds.items()
             if k != "pin_s" and v > 0}
    return {"ct_gb": round(ct_gb, 4), "labels_gb": round(labels_gb, 4), **{k: round(v, 5) for k, v in seconds.items()}, **rates,
            "summary": f"CT {ct_gb:.3f} GB up pinned {seconds['h2d_pinned_s']:.4f} s, labels down {seconds['d2h_pinned_s']:.4f} s"}


def time_pipeline(package, ct: dict, *, precision: str, cuda_graphs: bool, batch_size: int, device, repeats: int,
                  reference_labels=None) -> tuple[dict, object]:
    """One configuration end to end on the whole CT: a fresh runner, a cold run, then `repeats` timed runs (fastest kept)."""
    import numpy as np

    from model.segment import SegmentStats
    from model.segment_torch import segment_volume_device

    volume = ct["volume_zyx"]
    n_slices = volume.shape[0]

    def segment(stats):
        return segment_volume_device(volume, pixel_spacing_mm=ct["pixel_spacing_mm"], card=package.card, network=runner.run_device,
                                     device=device, batch_size=batch_size, slice_spacing_mm=ct["slice_spacing_mm"], stats=stats)

    release_device_memory()
    reset_peak_memory(device)
    started = time.perf_counter()
    with open_device_runner(package, precision=precision, cuda_graphs=cuda_graphs, device=device) as runner:
        synchronize(device)
        start_s = time.perf_counter() - started
        started = time.perf_counter()
        segment(SegmentStats())  # cold: cuDNN autotuning, CUDA graph capture, the allocator's first blocks
        cold_s = time.perf_counter() - started
        peak_cold = peak_memory_gib(device)
        runs = []
        for _ in range(repeats):
            stats = SegmentStats()
            reset_peak_memory(device)
            synchronize(device)
            started = time.perf_counter()
            labels = segment(stats)  # returns host labels: every copy and kernel is done
            runs.append((time.perf_counter() - started, stats, peak_memory_gib(device)))
        graphs = len(getattr(runner, "graphs", {}) or {})
        name = runner.name
    wall_s, stats, peak = min(runs, key=lambda run: run[0])
    stages = {k: round(v, 4) for k, v in stats.seconds.items()}
    around = sum(v for k, v in stats.seconds.items() if k != "network")
    row = {"runner": name, "device": str(device), "precision": precision, "cuda_graphs": cuda_graphs, "batch_size": batch_size,
           "slices": n_slices, "start_s": round(start_s, 3), "cold_s": round(cold_s, 3), "wall_s": round(wall_s, 4),
           "walls_s": [round(run[0], 4) for run in runs], "ms_per_slice": round(1000 * wall_s / n_slices, 3),
           "network_s": stages["network"], "around_network_s": round(around, 4), "stages_s": stages,
           "unaccounted_s": round(wall_s - sum(stats.seconds.values()), 4),
           "tiles": stats.tiles, "network_calls": stats.network_calls, "graphs_captured": graphs,
           "peak_gib": peak, "peak_cold_gib": peak_cold,
           "voxel_agreement": None if reference_labels is None else float(np.mean(labels == reference_labels))}
    return row, labels


# --- the report ----------------------------------------------------------------------------------------------------

def format_report(data: dict) -> str:
    steps = data["steps"]
    lines = [f"# GPU session ({data['mode']}), {data['started_at']}", "",
             f"elapsed {data['elapsed_s']} s of a {data['budget_s']:.0f} s budget; finished: {data['finished']}; "
             f"failed rows: {', '.join(data.get('failed_rows') or []) or 'none'}", ""]
    for name, step in steps.items():
        lines += [f"## {name}", ""] + ([step["note"], ""] if step.get("note") else [])
        for row in step["rows"]:
            if row["status"] != "ok":
                lines.append(f"- **{row['name']}: {row['status']}**: {row.get('error') or row.get('reason')}")
        ok = [row for row in step["rows"] if row["status"] == "ok"]
        if name == "environment":
            for row in ok:
                lines += [f"- {k}: {v}" for k, v in row.items() if k not in ("nvidia_smi", "modules", "status", "name")]
                lines += [f"- module {k}: {v}" for k, v in row.get("modules", {}).items()]
                lines += ["", "```", row.get("nvidia_smi", ""), "```"]
        elif name == "inputs":
            lines += [f"- {row['name']}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("name", "status")) for row in ok]
        elif name == "pytest":
            for row in ok:
                lines.append(f"- {row['summary']} (exit status {row['returncode']}, {row['seconds_pytest']} s)")
                lines += [f"  - {reason}" for reason in row["skip_reasons"]]
        elif name == "agreement":
            lines += ["| row | runner | slices | ORT fp32 CPU s | device s | voxel agreement | min Dice (labels) | labels below the bar | bar met |",
                      "|---|---|---:|---:|---:|---:|---:|---|---|"]
            lines += [f"| {r['name']} | {r['runner']} | {r['slices']} | {r['ort_fp32_cpu_s']} | {r['device_s']} | {percent(r['voxel_agreement'])} | "
                      f"{fmt(r['min_dice'])} ({r['labels_compared']}) | {r['labels_below_bar'] or ''} | {r['meets_bar']} |" for r in ok]
        elif name == "margins":
            lines += [f"- {row['name']}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("name", "status", "slice_indices"))
                      for row in ok]
        elif name == "timings":
            table = [r for r in ok if "wall_s" in r]
            lines += [f"- {r['name']}: {r.get('summary', '')}" for r in ok if "wall_s" not in r]
            lines += ["", "| row | cold s | wall s | ms/slice | network s | normalise+resample s | blend s | back+argmax s | unaccounted s "
                      "| peak GiB | network calls | voxels = first row of the model |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['name']} | {r['cold_s']:.2f} | {r['wall_s']:.3f} | {r['ms_per_slice']:.2f} | {r['network_s']:.3f} | "
                      f"{r['stages_s']['normalize_resample']:.3f} | {r['stages_s']['blend']:.3f} | {r['stages_s']['resample_back_argmax']:.3f} | "
                      f"{r['unaccounted_s']:.3f} | {fmt(r['peak_gib'])} | {r.get('network_calls', '')} | "
                      f"{percent(r['voxel_agreement'])} |" for r in table]
        lines.append("")
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:.4f} %"


# --- main ----------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for session.json, report.md and pytest.log (created)")
    parser.add_argument("--rehearse", action="store_true", help="the same code on the CPU device with a tiny CT and network")
    parser.add_argument("--budget-s", type=float, default=420.0, help="rows that would start after this many seconds are skipped (default 420)")
    parser.add_argument("--block-imports", nargs="*", default=None, metavar="MODULE",
                        help=f"make these unimportable (default with --rehearse: {' '.join(MISSING_THERE)}; else none)")
    parser.add_argument("--deps", type=Path, default=DEFAULT_DEPS,
                        help="staged pure-Python distributions, put first on the path if the folder exists (default .gpu-deps)")
    parser.add_argument("--stage-deps", nargs="?", type=Path, const=DEFAULT_DEPS, default=None, metavar="DIR",
                        help=f"copy {', '.join(STAGED_DISTRIBUTIONS)} from this Python to DIR (default .gpu-deps) and exit")
    parser.add_argument("--skip", nargs="*", default=[], choices=("pytest", "agreement", "margins", "timings"), help="leave out these steps")
    parser.add_argument("--timing-rows", default=None, metavar="REGEX",
                        help="only the timing rows whose name matches (re.search), e.g. 'demo .*b32' (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads of the reference (default: every usable CPU; 1 with --rehearse)")
    args = parser.parse_args(argv)
    if args.stage_deps is None and args.out is None:
        parser.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage_deps is not None:
        copied = stage_deps(args.stage_deps)
        print(f"staged {', '.join(STAGED_DISTRIBUTIONS)} ({copied / 1e6:.2f} MB) in {args.stage_deps}; carry it along (run's carry: "
              f"{args.stage_deps.relative_to(REPO) if args.stage_deps.is_relative_to(REPO) else args.stage_deps})")
        return 0
    blocked = list(args.block_imports if args.block_imports is not None else (MISSING_THERE if args.rehearse else ()))
    block_imports(blocked)  # before any of our modules is imported
    deps = use_deps(args.deps)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    faulthandler.dump_traceback_later(args.budget_s + 150, exit=True)  # a hang prints where it hangs and ends the run

    import torch

    sizes = REHEARSAL_SIZES if args.rehearse else GPU_SIZES
    if args.rehearse:  # one thread: tiny work, and a busy CI machine cannot stall torch's thread pool (10x slower seen)
        torch.set_num_threads(1)
    threads = args.threads or (1 if args.rehearse else len(os.sched_getaffinity(0)))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.rehearse else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, budget_s=args.budget_s, meta={
        "mode": "rehearse" if args.rehearse else "gpu", "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv,
        "device": str(device), "torch_threads": torch.get_num_threads(), "ort_threads": threads, "sizes": dict(vars(sizes))})

    session.step("environment")
    environment = session.run_row("environment", "environment", lambda: describe_environment(device=device, blocked=blocked, deps=deps),
                                  needs_budget=False)
    if not args.rehearse and device.type != "cuda":
        session.data["steps"]["environment"]["rows"].append(
            {"name": "cuda", "status": "failed", "error": f"no usable CUDA GPU: {environment and environment['cuda_status']}"})
        session.save(finished=True)
        print("no usable CUDA GPU: nothing to measure (--rehearse runs the same code on the CPU)", flush=True)
        return 1

    if "pytest" not in args.skip:
        session.step("pytest", f"`pytest -m gpu {' '.join(GPU_TEST_FILES)}` in a subprocess"
                               f"{' with ' + ', '.join(blocked) + ' blocked' if blocked else ''}; full output in pytest.log")
        session.run_row("pytest", "gpu tests", lambda: run_gpu_tests(out_dir=args.out, blocked=blocked,
                                                                       timeout_s=max(10.0, min(sizes.pytest_timeout_s, session.left_s()))))

    work = Path(tempfile.mkdtemp(prefix="trunkseg-gpu-session-"))
    try:
        session.step("inputs")
        inputs: dict = {}
        session.run_row("inputs", "CT", lambda: make_ct(sizes, into=inputs))
        session.run_row("inputs", "model packages", lambda: make_packages(sizes, work, into=inputs))
        if not {"ct", "paper", "demo"} <= set(inputs):
            for name in ("agreement", "margins", "timings"):  # recorded as not run, each with the reason
                if name not in args.skip:
                    session.step(name)["rows"].append({"name": name, "status": "skipped", "reason": "its inputs are missing (see inputs)"})
            session.save()
        else:
            ct, packages = inputs["ct"], {name: inputs[name] for name in ("paper", "demo")}
            if "agreement" not in args.skip:
                run_agreement(session, ct, packages, sizes=sizes, device=device, threads=threads)
            if "margins" not in args.skip:
                run_margins(session, ct, packages, sizes=sizes, device=device)
            if "timings" not in args.skip:
                run_timings(session, ct, packages, sizes=sizes, device=device, only=args.timing_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        session.save(finished=True)
    failed = session.failed_rows()
    print("\n" + (args.out / "report.md").read_text(), flush=True)
    bar = [f"{r['name']}: {'met' if r['meets_bar'] else 'NOT MET' if r['meets_bar'] is False else 'no label to compare'}"
           for r in session.data["steps"].get("agreement", {}).get("rows", []) if r["status"] == "ok"]
    print(f"\nfidelity bar (per-label Dice >= 0.99 vs ONNX Runtime fp32): {'; '.join(bar) or 'not measured'}", flush=True)
    print(f"done in {session.data['elapsed_s']} s; failed rows: {', '.join(failed) or 'none'}; files in {args.out}", flush=True)
    return 1 if failed else 0


def run_agreement(session: Session, ct: dict, packages: dict, *, sizes: Sizes, device, threads: int) -> None:
    session.step("agreement", f"device runner (CUDA graphs on, batch 8) vs ONNX Runtime fp32 on the CPU ({threads} threads) on a seeded "
                              f"subset of the CT's slices ({sizes.agreement_slices} of {ct['volume_zyx'].shape[0]}: ONNX Runtime fp32 "
                              f"on the CPU is slow for the paper network); bar: every label with >= {sizes.min_voxels_for_dice} voxels "
                              f"at Dice >= 0.99 (docs/gpu.md). The paper network has random weights: its near-ties make this a stress test")
    for model in ("demo", "paper"):
        slices = pick_subset(ct["volume_zyx"].shape[0], sizes.agreement_slices[model])
        references: dict = {}

        def reference() -> dict:
            if "done" not in references:
                references["done"] = segment_reference(packages[model], ct, slices, threads=threads)
            return references["done"]

        for precision in ("fp16", "fp32"):
            session.run_row("agreement", f"{model} {precision}", lambda: {
                **measure_agreement(packages[model], ct, reference(), precision=precision, device=device, min_voxels=sizes.min_voxels_for_dice),
                "slice_indices": slices})


def run_margins(session: Session, ct: dict, packages: dict, *, sizes: Sizes, device) -> None:
    session.step("margins", "where the network's fp16 argmax differs from its fp32 argmax on the device, is it a near-tie? The "
                            "fp32 top-2 logit margin at the flipped pixels against all pixels and against the fp16-fp32 logit "
                            "error; whole slices as single tiles (no resampling), no blending")
    for model in ("paper", "demo"):
        slices = pick_subset(ct["volume_zyx"].shape[0], sizes.margin_slices)
        session.run_row("margins", model, lambda: {**diagnose_margins(packages[model], ct, slices, device=device), "slice_indices": slices})


def diagnose_margins(package, ct: dict, slices: list[int], *, device) -> dict:
    """fp32 and fp16 logits of the same normalised slices through TorchCudaRunner (graphs off), compared pixel by pixel.

    A flip is explained by rounding when the fp32 margin there (top-1 minus top-2 logit) is below the fp16 logit
    error; `flips_within_error` says what share of the flips are. Slices are centre-cropped or padded to the tile.
    """
    import numpy as np
    import torch

    card = package.card
    norm = card.normalization
    tile_y, tile_x = card.tile_size
    volume = ct["volume_zyx"][slices].astype(np.float32)
    y0, x0 = max(0, (volume.shape[1] - tile_y) // 2), max(0, (volume.shape[2] - tile_x) // 2)
    crop = volume[:, y0:y0 + tile_y, x0:x0 + tile_x]
    tiles = np.zeros((len(slices), 1, tile_y, tile_x), np.float32)
    tiles[:, 0, :crop.shape[1], :crop.shape[2]] = (np.clip(crop, norm.clip_low, norm.clip_high) - np.float32(norm.mean)) / np.float32(norm.std)
    logits = {}
    for precision in ("fp32", "fp16"):
        with open_device_runner(package, precision=precision, cuda_graphs=False, device=device) as runner:
            logits[precision] = torch.cat([runner.run_device(torch.from_numpy(tiles[i:i + 4]).to(device)).float()
                                           for i in range(0, len(tiles), 4)])
    full, half = logits["fp32"], logits["fp16"]
    top2 = torch.topk(full, 2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).flatten()
    flipped = (full.argmax(1) != half.argmax(1)).flatten()
    error = (half - full).abs().amax(1).flatten()  # the largest logit error at each pixel
    quantiles = torch.tensor([0.01, 0.5, 0.99], device=full.device)

    def q(values) -> list:
        if values.numel() == 0:
            return []
        values = values.float()
        if values.numel() > 1 << 24:  # torch.quantile's input limit
            values = values[torch.randperm(values.numel(), device=values.device)[: 1 << 24]]
        return [round(float(v), 5) for v in torch.quantile(values, quantiles)]

    result = {
        "pixels": int(margin.numel()), "flipped_share": round(float(flipped.float().mean()), 6),
        "fp16_logits_finite": bool(torch.isfinite(half).all()), "fp32_logit_abs_max": round(float(full.abs().max()), 3),
        "fp32_logit_std": round(float(full.std()), 4),
        "margin_q01_q50_q99_all": q(margin), "margin_q01_q50_q99_flipped": q(margin[flipped]),
        "fp16_error_q01_q50_q99": q(error), "fp16_error_max": round(float(error.max()), 5),
        "flips_within_error": round(float((margin[flipped] <= error[flipped]).float().mean()), 4) if flipped.any() else None,
    }
    del logits, full, half
    release_device_memory()
    return result


def run_timings(session: Session, ct: dict, packages: dict, *, sizes: Sizes, device, only: str | None = None) -> None:
    shape = ct["volume_zyx"].shape
    session.step("timings", f"CT {shape[2]}x{shape[1]}x{shape[0]} at {ct['pixel_spacing_mm'][0]} mm in-plane "
                            f"({ct['slice_spacing_mm']:.2f} mm slices), {sizes.repeats} timed run(s) after a cold one, the fastest kept; "
                            f"stage times from segment_torch's CUDA events; 'unaccounted' = wall - stages (host staging, waits, "
                            f"copies the pipeline does not overlap); transfers measured on their own (first row)")
    session.run_row("timings", "transfers", lambda: measure_transfers(ct["volume_zyx"], device=device))
    references: dict = {}  # per model: the labels of its first row (fp32, batch 1)
    # CUDA graphs last: a capture that goes wrong (the next chunk's upload runs in a worker thread meanwhile) cannot
    # then cost the eager rows of the other model
    for precision, graphs in PRECISION_ROWS:
        for model in ("paper", "demo"):
            for batch_size in BATCH_SIZES:
                def measure() -> dict:
                    row, labels = time_pipeline(packages[model], ct, precision=precision, cuda_graphs=graphs, batch_size=batch_size,
                                                device=device, repeats=sizes.repeats, reference_labels=references.get(model))
                    references.setdefault(model, labels)
                    return {"model": model, **row}

                name = f"{model} {precision}{' graphs' if graphs else ''} b{batch_size}"
                if only is None or re.search(only, name):
                    session.run_row("timings", name, measure)
    references.clear()
    release_device_memory()


if __name__ == "__main__":
    raise SystemExit(main())
