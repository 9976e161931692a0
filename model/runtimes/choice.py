"""The choice of runtime and precision, and starting it: what process.py asks for in one call.

`choose_runtime`: on a GPU TensorRT, then PyTorch CUDA, each falling back (model/runtimes/gpu.py); else
OpenVINO, else ONNX Runtime. `start_runtime` enters the chosen runtime with the precision
model/runtimes/precision.py chooses for it, falling back down the GPU order when one fails to start
(TensorRT missing, an engine that cannot be built, out of GPU memory); the log and results.json say
what failed and what runs instead. `segmenter_for` pairs a runner with the slice pipeline that drives
it: the device pipeline (model/segment_torch.py) for a `DevicePipeline` runner, else model/segment.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from common.errors import ModelPackageError, RuntimeUnavailableError, TrunkSegError
from model.package import ModelPackage
from model.runtimes.contract import DevicePipeline, Runner
from model.runtimes.cpu import OnnxRuntimeRunner, OpenVinoRunner, TorchRunner
from model.runtimes.gpu import GPU_RUNTIMES, choose_gpu_runtime
from model.runtimes.precision import PrecisionChoice, choose_gpu_precision, choose_precision

RUNTIMES = ("auto", "openvino", "onnxruntime", "torch", "tensorrt")


@dataclass(frozen=True)
class RuntimeChoice:
    name: str
    reason: str
    fallbacks: tuple[str, ...] = ()  # tried in order when this one fails to start (auto on a GPU; model/runtimes/gpu.py)


def choose_runtime(requested: str) -> RuntimeChoice:
    """Which runtime to use, and why. `auto`: torch on CUDA when a GPU is visible, else OpenVINO, else ONNX Runtime."""
    if requested not in RUNTIMES:
        raise RuntimeUnavailableError(f"unknown runtime {requested!r} (choose from {', '.join(RUNTIMES)})")
    if requested in ("auto", "tensorrt"):  # on a GPU: TensorRT, else PyTorch CUDA, each falling back (model/runtimes/gpu.py)
        gpu = choose_gpu_runtime(requested, cpu_fallback="openvino" if importlib.util.find_spec("openvino") else "onnxruntime")
        if gpu.name is not None:
            return RuntimeChoice(gpu.name, gpu.reason, gpu.fallbacks)
    if requested == "auto":
        if importlib.util.find_spec("openvino") is not None:
            return RuntimeChoice("openvino", "no CUDA GPU visible: OpenVINO on the CPU (the fastest CPU runtime here)")
        if importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeUnavailableError("neither a CUDA GPU with torch nor openvino or onnxruntime is available")
        return RuntimeChoice("onnxruntime", "no CUDA GPU visible and openvino not installed: ONNX Runtime on the CPU")
    if importlib.util.find_spec(requested) is None:
        raise RuntimeUnavailableError(f"runtime {requested!r} requested but the {requested} package is not installed")
    if requested == "torch":
        return RuntimeChoice("torch-cuda" if _cuda_available() else "torch-cpu", "requested on the command line")
    return RuntimeChoice(requested, "requested on the command line")


def _cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    import torch

    return bool(torch.cuda.is_available())


def open_runtime(choice: RuntimeChoice, package: ModelPackage, *, threads: int | None = None, precision: str = "fp32") -> Runner:
    """The (not yet entered) runner for `choice`."""
    if choice.name == "onnxruntime":
        return OnnxRuntimeRunner(package, threads=threads, precision=precision)
    if choice.name == "openvino":
        return OpenVinoRunner(package, threads=threads, precision=precision)
    if choice.name in ("tensorrt", "torch-cuda"):  # the GPU runners (torch imported only here)
        return open_gpu_runtime(choice.name, package, precision=precision, log=lambda message: print(message, file=sys.stderr, flush=True))
    if choice.name in ("torch-cpu", "torch-cuda"):
        return TorchRunner(package, device="cuda" if choice.name == "torch-cuda" else "cpu", precision=precision, threads=threads)
    raise RuntimeUnavailableError(f"no runtime named {choice.name!r}")


def open_gpu_runtime(name: str, package: ModelPackage, *, precision: str, log: Callable[[str], None]) -> Runner:
    """The (not yet entered) GPU runtime `name`."""
    if name == "tensorrt":
        from model.runtimes.tensorrt import TensorRTRunner

        return TensorRTRunner(package, precision=precision, log=log)
    if name == "torch-cuda":
        from model.runtimes.cuda import TorchCudaRunner

        return TorchCudaRunner(package, precision=precision)
    raise RuntimeUnavailableError(f"no GPU runtime named {name!r}")


def segmenter_for(runtime: Runner, batch_size: int | None):
    """(segment function, network callable, batch size) for a runner: the device pipeline for a `DevicePipeline`, else the numpy one.

    `batch_size` None: the runner's preferred batch (GPU runners: their engine's optimum), else 4.
    """
    batch = batch_size or runtime.preferred_batch_size or 4
    if isinstance(runtime, DevicePipeline):
        from functools import partial

        from model.segment_torch import segment_volume_device  # torch: only where a GPU runtime runs

        return partial(segment_volume_device, device=runtime.device), runtime.run_device, batch
    from model.segment import segment_volume

    return segment_volume, runtime, batch


@dataclass(frozen=True)
class Started:
    """What actually runs: the entered runtime, the choice it came from (name, reason), its precision, and what failed before it."""

    runtime: Runner
    choice: RuntimeChoice
    precision: PrecisionChoice
    failures: tuple[str, ...]

    def describe(self) -> dict:
        """results.json's "runtime" entry: what runs and why, and what failed to start before it."""
        entry = {"name": self.choice.name, "reason": self.choice.reason, "precision": self.precision.name,
                 "precision_reason": self.precision.reason, "precision_verified": self.precision.verified}
        return {**entry, "failed_to_start": list(self.failures)} if self.failures else entry


@contextmanager
def start_runtime(first: RuntimeChoice, package: ModelPackage, *, open_runtime: Callable[[RuntimeChoice, str], Runner],
                  choose_precision: Callable[[str], PrecisionChoice], log: Callable[[str], None]) -> Iterator[Started]:
    """Enter `first` (a RuntimeChoice with optional `fallbacks`), else each fallback in turn, logging why.

    `open_runtime(choice, precision_name)` gives a runtime for any name; `choose_precision(name)` the
    precision for a runtime name. A bad model package is not a reason to fall back (every runtime would
    read the same package): it is raised. The last candidate's failure is raised as it is.
    """
    names = (first.name, *first.fallbacks)
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


def precision_for(requested: str, runtime: str, package: ModelPackage) -> PrecisionChoice:
    """GPU runtimes: fp16 unless fp32 is asked for; CPU runtimes: the card's recorded agreement decides (precision.py)."""
    if runtime in GPU_RUNTIMES:
        return choose_gpu_precision(requested, runtime=runtime)
    return choose_precision(requested, runtime=runtime, card=package.card)


def start_chosen_runtime(requested_runtime: str, requested_precision: str, package: ModelPackage, *, threads: int,
                         log: Callable[[str], None]):
    """The runtime `requested_runtime` resolves to, entered with its precision (falling back on a GPU): a context of `Started`."""
    return start_runtime(
        choose_runtime(requested_runtime), package,
        open_runtime=lambda choice, precision: open_runtime(choice, package, threads=threads, precision=precision),
        choose_precision=lambda name: precision_for(requested_precision, name, package), log=log,
    )
