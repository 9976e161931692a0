"""Export a network as a mixed-precision ONNX: float16 everywhere except its normalisation layers (float32).

For TensorRT 11, which builds only strongly typed networks (the precision of every tensor is the ONNX
graph's; BuilderFlag.FP16 is gone), and usable with TensorRT 10's STRONGLY_TYPED flag too. The graph's
input "image" and output "logits" stay float32 (a Cast at each end), so every runtime sees the same
interface. Normalisation layers (InstanceNorm, written out as two-pass reductions by
model.export.StableInstanceNorm2d; BatchNorm/GroupNorm/LayerNorm too) run in float32: in float16 their
statistics over a 512x512 plane lose too much (sums of 262144 terms).

Torch is imported at module level: only the GPU image and the development tools import this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.export import OPSET, StableInstanceNorm2d, for_export
from model.package import INPUT_NAME, OUTPUT_NAME

#: layer types kept in float32 inside a float16 network
FLOAT32_LAYERS = (StableInstanceNorm2d, torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
#: bump when the graph this module writes changes: part of the TensorRT engine cache key
FP16_EXPORT_VERSION = 1


class Float32Island(torch.nn.Module):
    """Runs the wrapped layer in float32 whatever its input's dtype; returns the input's dtype."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # also under autocast (model/runtimes/cuda.py)
            return self.layer(x.float()).to(x.dtype)


class HalfWithFloat32Norms(torch.nn.Module):
    """float32 in, float16 body with float32 normalisation layers, float32 out."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        body = for_export(network.eval().float())
        _wrap_norms(body)
        body.half()
        for module in body.modules():
            if isinstance(module, Float32Island):
                module.layer.float()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.to(torch.float16)).to(torch.float32)


def _wrap_norms(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, FLOAT32_LAYERS):
            setattr(module, name, Float32Island(child))
        else:
            _wrap_norms(child)


def export_onnx_fp16(network: torch.nn.Module, path: Path, *, input_channels: int, tile_size: tuple[int, int]) -> Path:
    """Write `network` as float16 ONNX with float32 normalisation layers and float32 I/O; check it with ONNX Runtime."""
    import onnx

    model = HalfWithFloat32Norms(network)
    example = torch.zeros(2, input_channels, *tile_size)
    path = Path(path)
    with torch.no_grad():
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET,
            do_constant_folding=True, dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    check_fp16_onnx(network, path, input_channels=input_channels, tile_size=tile_size)
    return path


def check_fp16_onnx(network: torch.nn.Module, path: Path, *, input_channels: int, tile_size: tuple[int, int]) -> float:
    """Relative max difference between the float32 network and the float16 ONNX on a seeded batch; raise if > 5 %.

    A coarse check that the export is the same network (a wrong layer would be off by 100 %); the
    fidelity that matters, labels on a CT, is tested on the demo model (tests/test_tensorrt_export.py).
    """
    import onnxruntime

    sample = np.random.default_rng(0).normal(size=(2, input_channels, *tile_size)).astype(np.float32)
    with torch.no_grad():
        expected = network.eval().float()(torch.from_numpy(sample)).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: sample})[0]
    if got.dtype != np.float32 or got.shape != expected.shape:
        raise RuntimeError(f"{path}: float16 export gives {got.dtype} {got.shape}, expected float32 {expected.shape}")
    error = float(np.abs(got - expected).max() / max(1e-6, float(np.abs(expected).max())))
    if error > 0.05:
        raise RuntimeError(f"{path}: float16 export differs from the float32 network by {error:.1%} of its range")
    return error
