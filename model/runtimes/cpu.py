"""The CPU runners: OpenVINO (the default on a CPU), ONNX Runtime and PyTorch eager (model/runtimes/contract.py's contract).

- openvino: OpenVINO on the CPU over the package's ONNX export: fp32, bf16 (AMX / AVX512-BF16: about
  4x fp32 on the development machine), int8 (the package's statically quantized ONNX, see
  model/quantize.py) or int8+bf16 (that int8 graph with its float parts, the normalisation and
  activations between the int8 convolutions, in bf16).
- onnxruntime: ONNX Runtime on the CPU: fp32 or int8 (it has no bf16 convolution on x86).
- torch: PyTorch eager from the safetensors weights on the CPU (fp32, or bf16 autocast); the GPU runners
  are model/runtimes/cuda.py and tensorrt.py.

Which precision a runner runs is model/runtimes/precision.py's choice.
"""

from __future__ import annotations

import numpy as np

from common.errors import ModelPackageError, RuntimeUnavailableError
from model.package import INPUT_NAME, OUTPUT_NAME, ModelPackage
from model.runtimes.contract import check_batch, check_logits, check_output_buffer
from model.runtimes.precision import onnx_role, uses_bf16


class OpenVinoRunner:
    """OpenVINO on the CPU over the package's ONNX export, in fp32, bf16, int8 (the quantized export) or int8+bf16.

    bf16 is OpenVINO's INFERENCE_PRECISION_HINT: convolutions in bf16 on AMX/AVX512-BF16, InstanceNorm
    statistics and the output in f32. int8 runs the quantized export with its float parts (InstanceNorm,
    LeakyReLU, the transposed convolutions OpenVINO keeps in float, the logits layer) in f32; int8+bf16
    runs the same graph under the bf16 hint, so those float parts run in bf16 (on the paper-sized network
    they were a third of int8's time; docs/benchmarks.md). On a CPU without native bf16 OpenVINO would
    quietly run f32, so asking for bf16 or int8+bf16 there is an error. One stream, `threads` inference threads (process.py:
    the CPUs the scheduler grants), not pinned to cores, latency mode; with
    the same settings on the same machine the output is the same from run to run (tested).
    """

    precisions = ("fp32", "bf16", "int8", "int8+bf16")
    #: one tile per call is the fastest here for 256x256 and 512x512 tiles alike (docs/benchmarks.md)
    preferred_batch_size = 1

    def __init__(self, package: ModelPackage, *, threads: int | None = None, precision: str = "fp32"):
        if precision not in self.precisions:
            raise RuntimeUnavailableError(f"openvino: precision {precision!r} is not available (choose from {', '.join(self.precisions)})")
        self.package = package
        self.threads = threads
        self.precision = precision
        self.name = f"openvino-{precision}"
        self.request = None

    def __enter__(self) -> "OpenVinoRunner":
        import openvino

        core = openvino.Core()
        if uses_bf16(self.precision) and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise RuntimeUnavailableError("openvino: this CPU has no native bf16 (AMX or AVX512-BF16); use --precision fp32")
        path = self.package.path_of(onnx_role(self.precision))
        try:
            model = core.read_model(str(path))
        except Exception as error:  # OpenVINO raises its own untyped errors for bad files
            raise ModelPackageError(f"{path}: OpenVINO cannot read the model ({str(error)[:200]})") from None
        card = self.package.card
        inputs = {name: port for port in model.inputs for name in port.get_names()}
        outputs = {name: port for port in model.outputs for name in port.get_names()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ModelPackageError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found {list(inputs)} -> {list(outputs)}")
        shape = inputs[INPUT_NAME].get_partial_shape()
        if [d.get_length() if d.is_static else None for d in shape][1:] != [card.input_channels, *card.tile_size]:
            raise ModelPackageError(f"{path}: input shape {shape} does not match the card's tile {card.tile_size}")
        classes = outputs[OUTPUT_NAME].get_partial_shape()[1]
        if not classes.is_static or classes.get_length() != card.num_classes:
            raise ModelPackageError(f"{path}: output has {classes} classes, card says {card.num_classes}")
        compiled = core.compile_model(model, "CPU", self.compile_config())
        self._output = compiled.output(OUTPUT_NAME)
        self.request = compiled.create_infer_request()
        self._own_output = self.request.get_tensor(self._output)
        return self

    def compile_config(self) -> dict:
        """OpenVINO's CPU settings for this runner (benchmarks/bench_cpu_precision.py --layers adds PERF_COUNT to them)."""
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if uses_bf16(self.precision) else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # Threads float over the cores the process may use instead of each being pinned to one: on a node shared
            # with other jobs a pinned thread waits for its busy core while every other thread waits for it
            # (benchmarks/bench_contention.py; docs/benchmarks.md "Shared nodes").
            "ENABLE_CPU_PINNING": False,
        }
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def __exit__(self, *exc) -> None:
        self.request = self._own_output = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        card = self.package.card
        check_batch(batch, card.input_channels, card.tile_size, self.name)
        self.request.set_tensor(self._output, self._own_output)  # never a caller's array that infer_into lent it
        logits = self.request.infer({INPUT_NAME: np.ascontiguousarray(batch)})[self._output]  # a copy: the request reuses its buffer
        return check_logits(logits, batch, card.num_classes, self.name)

    def infer_into(self, batch: np.ndarray, out: np.ndarray) -> None:
        """The logits of `batch` written straight into `out` (float32, C-contiguous, (batch, classes, tile_y, tile_x)).

        OpenVINO writes into the caller's memory (a shared Tensor), so the 24 MB of logits of a 512x512 tile are
        neither copied out of the request nor allocated per call; the segmenter's own buffer receives them.
        """
        import openvino

        card = self.package.card
        check_batch(batch, card.input_channels, card.tile_size, self.name)
        check_output_buffer(out, (batch.shape[0], card.num_classes, *card.tile_size), self.name)
        self.request.set_tensor(self._output, openvino.Tensor(out, shared_memory=True))
        self.request.infer({INPUT_NAME: np.ascontiguousarray(batch)})


class OnnxRuntimeRunner:
    """ONNX Runtime on the CPU over the package's ONNX export (fp32) or its quantized export (int8)."""

    precisions = ("fp32", "int8")

    @property
    def preferred_batch_size(self) -> int:
        """Measured on 2 cores: 512x512 tiles one per call (batch 2 was 20 % slower per tile), smaller ones 4 per call."""
        tile = self.package.card.tile_size
        return 1 if tile[0] * tile[1] >= 384 * 384 else 4

    def __init__(self, package: ModelPackage, *, threads: int | None = None, precision: str = "fp32"):
        if precision not in self.precisions:
            raise RuntimeUnavailableError(f"onnxruntime: precision {precision!r} is not available (choose from {', '.join(self.precisions)})")
        self.package = package
        self.threads = threads
        self.precision = precision
        self.name = "onnxruntime" if precision == "fp32" else f"onnxruntime-{precision}"
        self.session = None

    def __enter__(self) -> "OnnxRuntimeRunner":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        path = self.package.path_of(onnx_role(self.precision))
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
        check_batch(batch, card.input_channels, card.tile_size, self.name)
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})[0]
        return check_logits(logits, batch, card.num_classes, self.name)


class TorchRunner:
    """PyTorch eager from the safetensors weights (never a pickle), on CPU or CUDA."""

    @property
    def preferred_batch_size(self) -> int | None:
        """On the CPU one tile per call (512x512: batch 2 was 17 % slower per tile on 2 cores); elsewhere the caller's default."""
        return 1 if self.device == "cpu" else None

    def __init__(self, package: ModelPackage, *, device: str = "cpu", precision: str = "fp32", threads: int | None = None):
        if precision not in ("fp32", "bf16", "fp16"):
            raise RuntimeUnavailableError(f"torch: precision {precision!r} is not available (choose from fp32, bf16, fp16)")
        self.package = package
        self.device = device
        self.precision = precision
        self.threads = threads
        self.name = f"torch-{device}-{precision}"
        self.network = None

    def __enter__(self) -> "TorchRunner":
        import torch

        from model.network import load_package_network

        if self.threads:
            torch.set_num_threads(self.threads)
        network = load_package_network(self.package)
        memory_format = torch.channels_last if self.precision != "fp32" else torch.contiguous_format
        self.network = network.to(self.device, memory_format=memory_format)
        self._torch = torch
        return self

    def __exit__(self, *exc) -> None:
        self.network = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        card = self.package.card
        check_batch(batch, card.input_channels, card.tile_size, self.name)
        torch = self._torch
        x = torch.from_numpy(batch).to(self.device)
        if self.precision != "fp32":
            x = x.to(memory_format=torch.channels_last)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            logits = self.network(x)
        return check_logits(logits.float().cpu().numpy(), batch, card.num_classes, self.name)
