"""Inference runtimes behind one interface: a context manager that is a callable `batch -> logits`.

Each runtime checks its named input and output (shape, dtype) the way Polygraphy's runners do:
input "image" float32 (batch, channels, tile_y, tile_x), output "logits" float32 (batch, classes,
tile_y, tile_x). `open_runtime` picks one and says why.

- onnxruntime: ONNX Runtime on the CPU, the default without a GPU (the CPU image has no torch).
- torch: PyTorch eager from the safetensors weights, on CPU or CUDA (fp32, or bf16/fp16 autocast).
- tensorrt: the seam for TensorRT engines (issue: GPU path). Not implemented in this build; asking
  for it is an error rather than a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model.package import INPUT_NAME, OUTPUT_NAME, ModelPackage
from preprocess.errors import ModelPackageError, RuntimeUnavailableError

RUNTIMES = ("auto", "onnxruntime", "torch", "tensorrt")


class Runtime(Protocol):
    name: str

    def __enter__(self) -> "Runtime": ...

    def __exit__(self, *exc) -> None: ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def _check_batch(batch: np.ndarray, channels: int, tile: tuple[int, int], who: str) -> None:
    if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
        raise TypeError(f"{who}: input {INPUT_NAME!r} must be a float32 numpy array, got {getattr(batch, 'dtype', type(batch))}")
    if batch.ndim != 4 or batch.shape[1] != channels or tuple(batch.shape[2:]) != tuple(tile):
        raise ValueError(f"{who}: input {INPUT_NAME!r} must be (batch, {channels}, {tile[0]}, {tile[1]}), got {batch.shape}")


def _check_logits(logits: np.ndarray, batch: np.ndarray, classes: int, who: str) -> np.ndarray:
    expected = (batch.shape[0], classes, *batch.shape[2:])
    if logits.shape != expected:
        raise RuntimeError(f"{who}: output {OUTPUT_NAME!r} has shape {logits.shape}, expected {expected}")
    return logits if logits.dtype == np.float32 else logits.astype(np.float32)


class OnnxRuntimeRunner:
    """ONNX Runtime on the CPU over the package's ONNX export."""

    name = "onnxruntime"

    def __init__(self, package: ModelPackage, *, threads: int | None = None):
        self.package = package
        self.threads = threads
        self.session = None

    def __enter__(self) -> "OnnxRuntimeRunner":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        path = self.package.path_of("onnx")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped errors for bad files
            raise ModelPackageError(f"{path}: ONNX Runtime cannot load the model ({str(error)[:200]})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        card = self.package.card
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ModelPackageError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found {list(inputs)} -> {list(outputs)}")
        shape = inputs[INPUT_NAME].shape
        if shape[1:] != [card.input_channels, *card.tile_size]:
            raise ModelPackageError(f"{path}: input shape {shape} does not match the card's tile {card.tile_size}")
        if outputs[OUTPUT_NAME].shape[1] != card.num_classes:
            raise ModelPackageError(f"{path}: output has {outputs[OUTPUT_NAME].shape[1]} classes, card says {card.num_classes}")
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        card = self.package.card
        _check_batch(batch, card.input_channels, card.tile_size, self.name)
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})[0]
        return _check_logits(logits, batch, card.num_classes, self.name)


class TorchRunner:
    """PyTorch eager from the safetensors weights (never a pickle), on CPU or CUDA."""

    def __init__(self, package: ModelPackage, *, device: str = "cpu", precision: str = "fp32", threads: int | None = None):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {precision!r}")
        self.package = package
        self.device = device
        self.precision = precision
        self.threads = threads
        self.name = f"torch-{device}-{precision}"
        self.network = None

    def __enter__(self) -> "TorchRunner":
        import torch
        from safetensors.torch import load_model

        from model.network import build_network

        if self.threads:
            torch.set_num_threads(self.threads)
        card = self.package.card
        network = build_network(
            network_class_name=card.network_class_name, arch_kwargs=card.arch_kwargs,
            input_channels=card.input_channels, num_classes=card.num_classes,
        )
        path = self.package.path_of("weights")
        try:
            missing, unexpected = load_model(network, str(path), strict=False)
        except Exception as error:  # safetensors raises several types for corrupt files
            raise ModelPackageError(f"{path}: cannot load weights ({str(error)[:200]})") from None
        if missing or unexpected:
            raise ModelPackageError(f"{path}: weights do not fit the architecture (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        memory_format = torch.channels_last if self.precision != "fp32" else torch.contiguous_format
        self.network = network.eval().to(self.device, memory_format=memory_format)
        self._torch = torch
        return self

    def __exit__(self, *exc) -> None:
        self.network = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        card = self.package.card
        _check_batch(batch, card.input_channels, card.tile_size, self.name)
        torch = self._torch
        x = torch.from_numpy(batch).to(self.device)
        if self.precision != "fp32":
            x = x.to(memory_format=torch.channels_last)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            logits = self.network(x)
        return _check_logits(logits.float().cpu().numpy(), batch, card.num_classes, self.name)


@dataclass(frozen=True)
class RuntimeChoice:
    name: str
    reason: str


def choose_runtime(requested: str) -> RuntimeChoice:
    """Which runtime to use, and why. `auto`: torch on CUDA when a GPU is visible, else ONNX Runtime."""
    if requested not in RUNTIMES:
        raise RuntimeUnavailableError(f"unknown runtime {requested!r} (choose from {', '.join(RUNTIMES)})")
    if requested == "tensorrt":
        raise RuntimeUnavailableError("runtime 'tensorrt' is not part of this build yet (GPU path issue); use onnxruntime or torch")
    if requested == "auto":
        if importlib.util.find_spec("torch") is not None and _cuda_available():
            return RuntimeChoice("torch-cuda", "a CUDA GPU is visible and torch is installed")
        if importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeUnavailableError("neither a CUDA GPU with torch nor onnxruntime is available")
        return RuntimeChoice("onnxruntime", "no CUDA GPU visible: ONNX Runtime on the CPU")
    if importlib.util.find_spec(requested) is None:
        raise RuntimeUnavailableError(f"runtime {requested!r} requested but the {requested} package is not installed")
    if requested == "torch":
        return RuntimeChoice("torch-cuda" if _cuda_available() else "torch-cpu", "requested on the command line")
    return RuntimeChoice("onnxruntime", "requested on the command line")


def _cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    import torch

    return bool(torch.cuda.is_available())


def open_runtime(choice: RuntimeChoice, package: ModelPackage, *, threads: int | None = None, precision: str = "fp32") -> Runtime:
    """The (not yet entered) runtime for `choice`."""
    if choice.name == "onnxruntime":
        return OnnxRuntimeRunner(package, threads=threads)
    if choice.name in ("torch-cpu", "torch-cuda"):
        return TorchRunner(package, device="cuda" if choice.name == "torch-cuda" else "cpu", precision=precision, threads=threads)
    raise RuntimeUnavailableError(f"no runtime named {choice.name!r}")
