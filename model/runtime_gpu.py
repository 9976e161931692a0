"""GPU runtimes: whether a GPU can be used, which runtime and precision run on it, and starting with a fallback.

Order on a GPU: TensorRT (engine built on first use, see model/tensorrt_runtime.py), then PyTorch on
CUDA (model/cuda_runtime.py), then the CPU. `auto` falls back down that order when a runtime fails to
start (TensorRT missing, an engine that cannot be built, out of GPU memory), and the log and
results.json say what failed and what runs instead; an explicitly requested runtime that cannot run
is an error, never a silent substitute.

Torch-free at import: the CPU image has no torch, and imports this module only to learn that.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from preprocess.errors import ModelPackageError, RuntimeUnavailableError, TrunkSegError

GPU_RUNTIMES = ("tensorrt", "torch-cuda")


@dataclass(frozen=True)
class CudaStatus:
    usable: bool
    description: str  # the GPU, its driver and CUDA, or why none can be used


def cuda_status() -> CudaStatus:
    """Whether a CUDA GPU can be used here, and what was found (the GPU image checks this at start)."""
    if importlib.util.find_spec("torch") is None:
        return CudaStatus(False, "torch is not installed (the CPU image)")
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return CudaStatus(False, "CUDA_VISIBLE_DEVICES is empty")
    import torch

    if torch.version.cuda is None:
        return CudaStatus(False, f"torch {torch.__version__} is a CPU build")
    if not torch.cuda.is_available():
        return CudaStatus(False, f"no usable CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda}: no driver or no "
                                 f"device; in a container, run it with --gpus all)")
    from model.cuda_runtime import describe_cuda

    info = describe_cuda(torch.cuda.current_device())
    return CudaStatus(True, f"{info['gpu']} (sm {info['compute_capability']}, {info['memory_gib']} GiB, driver "
                            f"{info['driver'] or 'version unknown'}, torch {info['torch']} with CUDA {info['torch_cuda']})")


def tensorrt_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt", "tensorrt_bindings"))


def import_tensorrt():
    """TensorRT's Python module: `tensorrt` (what the tensorrt-cuXX package installs), else the bare bindings
    wheel's `tensorrt_bindings` (the same API; the gpu image installs only tensorrt-cu13-libs and -bindings)."""
    try:
        import tensorrt
    except ImportError:
        import tensorrt_bindings as tensorrt
    return tensorrt


def tensorrt_version() -> str | None:
    if not tensorrt_installed():
        return None
    return import_tensorrt().__version__


@dataclass(frozen=True)
class GpuChoice:
    """A runtime on the GPU, or None with the reason there is none; `fallbacks` are tried in order if it fails to start."""

    name: str | None
    reason: str
    fallbacks: tuple[str, ...] = ()


def choose_gpu_runtime(requested: str, *, cpu_fallback: str | None) -> GpuChoice:
    """The GPU runtime for `requested` (auto, tensorrt or torch), or name None when it runs on the CPU.

    `auto` takes TensorRT when it is installed, else PyTorch CUDA; `cpu_fallback` (the CPU runtime auto
    would pick) ends its fallback list. `tensorrt` without TensorRT or a GPU is an error.
    """
    status = cuda_status()
    if requested == "tensorrt":
        version = tensorrt_version()
        if version is None:
            raise RuntimeUnavailableError("runtime 'tensorrt' requested but TensorRT is not installed (the gpu image has it; see docker/requirements-gpu.txt)")
        if not status.usable:
            raise RuntimeUnavailableError(f"runtime 'tensorrt' requested but {status.description}")
        return GpuChoice("tensorrt", f"requested on the command line; TensorRT {version} on {status.description}")
    if not status.usable:
        return GpuChoice(None, status.description)
    if requested == "torch":
        return GpuChoice("torch-cuda", f"requested on the command line; {status.description}")
    cpu = (cpu_fallback,) if cpu_fallback else ()
    version = tensorrt_version()
    if version is not None:
        return GpuChoice("tensorrt", f"TensorRT {version} on {status.description}", ("torch-cuda", *cpu))
    return GpuChoice("torch-cuda", f"TensorRT not installed: PyTorch CUDA on {status.description}", cpu)


@dataclass(frozen=True)
class GpuPrecision:
    name: str
    reason: str
    verified: bool


def choose_gpu_precision(requested: str, *, runtime: str) -> GpuPrecision:
    """fp16 on the GPU unless fp32 is asked for: float16 with float32 normalisation layers (tests/test_tensorrt.py
    holds the fp16 engine to per-label Dice >= 0.99 against fp32 ONNX Runtime, on a GPU)."""
    if requested in ("auto", "fp16"):
        return GpuPrecision("fp16", f"{runtime}: float16 with float32 normalisation layers (the GPU default)", True)
    if requested == "fp32":
        return GpuPrecision("fp32", "requested on the command line", True)
    raise RuntimeUnavailableError(f"{runtime}: precision {requested!r} is not available on the GPU (choose auto, fp16 or fp32)")


def open_gpu_runtime(name: str, package, *, precision: str, log: Callable[[str], None]):
    """The (not yet entered) GPU runtime `name`."""
    if name == "tensorrt":
        from model.tensorrt_runtime import TensorRTRunner

        return TensorRTRunner(package, precision=precision, log=log)
    if name == "torch-cuda":
        from model.cuda_runtime import TorchCudaRunner

        return TorchCudaRunner(package, precision=precision)
    raise RuntimeUnavailableError(f"no GPU runtime named {name!r}")


def segmenter_for(runtime, batch_size: int | None):
    """(segment function, network callable, batch size) for a runtime: the device pipeline for GPU runtimes, else the numpy one.

    `batch_size` None: the runtime's preferred batch (GPU runtimes: their engine's optimum), else 4.
    """
    batch = batch_size or getattr(runtime, "preferred_batch_size", None) or 4
    if getattr(runtime, "device_pipeline", False):
        from functools import partial

        from model.segment_torch import segment_volume_device  # torch: only where a GPU runtime runs

        return partial(segment_volume_device, device=runtime.device), runtime.run_device, batch
    from model.segment import segment_volume

    return segment_volume, runtime, batch


@dataclass(frozen=True)
class Started:
    """What actually runs: the entered runtime, the choice it came from (name, reason), its precision, and what failed before it."""

    runtime: object
    choice: object  # a RuntimeChoice
    precision: object  # a PrecisionChoice-like (name, reason, verified)
    failures: tuple[str, ...]


@contextmanager
def start_runtime(first, package, *, open_runtime: Callable, choose_precision: Callable[[str], object],
                  log: Callable[[str], None]) -> Iterator[Started]:
    """Enter `first` (a RuntimeChoice with optional `fallbacks`), else each fallback in turn, logging why.

    `open_runtime(choice, precision_name)` gives a runtime for any name; `choose_precision(name)` the
    precision for a runtime name. A bad model package is not a reason to fall back (every runtime would
    read the same package): it is raised. The last candidate's failure is raised as it is.
    """
    names = (first.name, *getattr(first, "fallbacks", ()))
    failures: list[str] = []
    for index, name in enumerate(names):
        choice = first if index == 0 else replace(first, name=name, reason=f"fallback after {'; '.join(failures)}", fallbacks=())
        try:
            precision = choose_precision(name)
            runtime = open_runtime(choice, precision.name)
            runtime.__enter__()
        except ModelPackageError:
            raise
        except (TrunkSegError, RuntimeError, OSError, ImportError) as error:  # RuntimeError: CUDA and TensorRT failures
            if index == len(names) - 1:
                if isinstance(error, TrunkSegError) or not failures:
                    raise
                raise RuntimeUnavailableError(f"{name} failed to start ({error}) after {'; '.join(failures)}") from error
            failures.append(f"{name} failed to start: {' '.join(str(error).split())[:300]}")
            log(f"runtime {name} failed to start ({' '.join(str(error).split())[:300]}); falling back to {names[index + 1]}")
            continue
        try:
            yield Started(runtime, choice, precision, tuple(failures))
        finally:
            runtime.__exit__(None, None, None)
        return
