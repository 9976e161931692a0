"""The GPU probe: whether a CUDA GPU can be used here, whether TensorRT is installed, and which GPU runtime to try first.

Order on a GPU: TensorRT (engine built on first use, see model/runtimes/tensorrt.py), then PyTorch on
CUDA (model/runtimes/cuda.py), then the CPU. `auto` falls back down that order when a runtime fails to
start (model/runtimes/choice.py's start_runtime); an explicitly requested runtime that cannot run is an
error, never a silent substitute.

Torch-free at import: the CPU image has no torch, and imports this module only to learn that.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from common.errors import RuntimeUnavailableError

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
    from model.runtimes.cuda import describe_cuda

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
