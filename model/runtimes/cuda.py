"""PyTorch on CUDA as a runtime: fp16 autocast (normalisation layers in float32), channels_last, CUDA graphs.

The second GPU runtime, and the fallback when TensorRT is missing or fails to start. Written for a
CUDA GPU and NOT run on one while this project was built (no GPU on its machines); the CPU-side
logic is tested, the CUDA tests are marked `gpu` and skip saying so.

- fp16: torch.autocast(float16); every normalisation layer runs in float32 (model.export_fp16's
  Float32Island), as in the float16 ONNX, since InstanceNorm statistics over a 512x512 plane drift in
  float16. fp32 runs with TF32 off (matmul and cuDNN), so "fp32" means float32.
- CUDA graphs: for each batch size seen (at most `max_graphs`), the network is captured once after a
  warm-up on a side stream and replayed from then on: one launch instead of hundreds of kernels per
  batch, which matters for small tiles and batches. Input goes through a static buffer; the output is
  cloned out of the graph's buffer so that a later replay cannot overwrite what the caller holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import torch

from model.package import ModelPackage
from model.runtimes.contract import check_batch, check_logits
from common.errors import RuntimeUnavailableError

PRECISIONS = ("fp16", "fp32")


def describe_cuda(device_index: int = 0) -> dict:
    """The GPU, its driver and the CUDA build of torch, for the log and results.json (requires a visible GPU)."""
    props = torch.cuda.get_device_properties(device_index)
    info = {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": nvidia_driver_version(),
    }
    return info


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi (mounted into containers by --gpus with the utility capability), else None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def float32_norms(network: torch.nn.Module) -> torch.nn.Module:
    """`network` with each normalisation layer wrapped to run in float32 (in place; returns it)."""
    from model.export_fp16 import FLOAT32_LAYERS, Float32Island

    def wrap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, FLOAT32_LAYERS):
                setattr(module, name, Float32Island(child))
            elif not isinstance(child, Float32Island):
                wrap(child)

    wrap(network)
    return network


def cudnn_autotuning() -> bool:
    """Whether cuDNN times its convolution algorithms on first use (`TRUNKSEG_CUDNN_BENCHMARK=1`); off by default.

    Measured on an H200 for the paper-sized network (fp16, batch 16, 512x512x300; benchmarks/gpu_cold_start.py): the
    autotuning added 1.4 s to a fresh process's first CT (3.0 s against 1.5 s) and gained nothing after it (0.73 s
    against 0.72 s a CT). At fp32 and batch 32 it took 43 s. A job segments one CT per process, so it is off.
    Turn it on for a long multi-case run with a network it does speed up.
    """
    return os.environ.get("TRUNKSEG_CUDNN_BENCHMARK", "0") == "1"


def padded_batch_size(count: int, sizes_run: set[int]) -> int:
    """The batch size to run `count` tiles at: the smallest size already run that holds them, else `count`.

    A volume's last batch is usually short (300 slices in batches of 16 leave 12). Run at its own size it costs a
    second cuDNN autotuning and a second CUDA graph capture, which made a fresh process's first 512x512x300 CT take
    3.2-4.0 s against 0.2-0.7 s warm on an H200 (benchmarks/gpu_cold_start.py); zeros padding it costs a few tiles.
    """
    fitting = [size for size in sizes_run if size >= count]
    return min(fitting) if fitting else count


class TorchCudaRunner:
    """PyTorch on one CUDA GPU from the safetensors weights: `run_device(tensor) -> tensor` and the numpy `__call__`."""


    def __init__(self, package: ModelPackage, *, precision: str = "fp16", device: str = "cuda", cuda_graphs: bool = True,
                 max_graphs: int = 4, batch_size: int = 16):
        if precision == "auto":
            precision = "fp16"
        if precision not in PRECISIONS:
            raise RuntimeUnavailableError(f"torch-cuda: precision {precision!r} is not available (choose from {', '.join(PRECISIONS)})")
        self.package = package
        self.precision = precision
        self.device = device
        self.cuda_graphs = cuda_graphs and os.environ.get("TRUNKSEG_CUDA_GRAPHS", "1") != "0"
        self.max_graphs = max_graphs
        self.preferred_batch_size = batch_size
        self.name = f"torch-cuda-{precision}"
        #: run a short batch padded to a batch size already run: no new cuDNN autotuning, no new graph capture
        self.pad_batches = True
        self.sizes_run: set[int] = set()
        self.network = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> "TorchCudaRunner":
        from model.network import load_package_network

        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("torch-cuda: no CUDA GPU visible to torch")
        self.device = torch.device(self.device)
        network = load_package_network(self.package)
        if self.precision == "fp16":
            float32_norms(network)
        torch.backends.cudnn.benchmark = cudnn_autotuning()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.network = network.eval().to(self.device, memory_format=torch.channels_last)
        self.graphs, self.sizes_run = {}, set()
        return self

    def __exit__(self, *exc) -> None:
        self.graphs, self.sizes_run = {}, set()
        self.network = None

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.precision == "fp16", cache_enabled=False):
            return self.network(x)

    def _graph_for(self, batch: torch.Tensor):
        size = batch.shape[0]
        if size in self.graphs or len(self.graphs) >= self.max_graphs:
            return self.graphs.get(size)
        static_in = torch.empty_like(batch, memory_format=torch.channels_last)
        static_in.copy_(batch)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture: cuDNN autotuning, lazy initialisation
                self._eager(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the slice pipeline's upload thread pins and copies the next chunk meanwhile, on its own stream;
        # under the default ("global") mode CUDA refuses such calls from any thread while this stream captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self._eager(static_in)
        self.graphs[size] = (graph, static_in, static_out)
        return self.graphs[size]

    def run_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a (B, channels, tile_y, tile_x) float32 CUDA tensor, queued on the current stream."""
        card = self.package.card
        if batch.device.type != "cuda" or batch.dtype != torch.float32:
            raise TypeError(f"{self.name}: input 'image' must be a float32 CUDA tensor, got {batch.dtype} on {batch.device}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (card.input_channels, *card.tile_size):
            raise ValueError(f"{self.name}: input 'image' must be (batch, {card.input_channels}, {card.tile_size[0]}, {card.tile_size[1]}), got {tuple(batch.shape)}")
        count = batch.shape[0]
        size = padded_batch_size(count, self.sizes_run) if self.pad_batches else count
        with torch.inference_mode():
            if size > count:
                batch = torch.cat([batch, batch.new_zeros((size - count, *batch.shape[1:]))])
            captured = self._graph_for(batch) if self.cuda_graphs else None
            if captured is None:
                out = self._eager(batch.contiguous(memory_format=torch.channels_last))[:count]
            else:
                graph, static_in, static_out = captured
                static_in.copy_(batch)
                graph.replay()
                out = static_out[:count].clone()
        self.sizes_run.add(size)
        expected = (count, card.num_classes, *card.tile_size)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"{self.name}: output 'logits' has shape {tuple(out.shape)}, expected {expected}")
        return out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        card = self.package.card
        check_batch(batch, card.input_channels, card.tile_size, self.name)
        logits = self.run_device(torch.from_numpy(batch).to(self.device))
        return check_logits(logits.float().cpu().numpy(), batch, card.num_classes, self.name)
