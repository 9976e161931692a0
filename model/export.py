"""Export a network to ONNX with a dynamic batch axis (fixed tile shape), and check the export.

Input "image": (batch, channels, tile_y, tile_x) float32; output "logits": (batch, classes, tile_y, tile_x).
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from model.package import INPUT_NAME, OUTPUT_NAME

OPSET = 17


class StableInstanceNorm2d(torch.nn.Module):
    """InstanceNorm2d written out as ONNX ops whose reductions run row by row, then over rows (two-pass).

    ONNX Runtime's InstanceNormalization (and a single ReduceMean over H*W) sums a whole 512x512 plane
    in float32: measured on nnU-Net's default 2d network for 512x512 tiles, logits off by 3e-2 from a
    float64 reference (torch: 7e-5), enough to flip 0.5 % of voxels of a random network. Reducing over
    W, then H, keeps every sum short: 2e-4, at the same speed.
    """

    def __init__(self, norm: torch.nn.InstanceNorm2d):
        super().__init__()
        self.eps = float(norm.eps)
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight[None, :, None, None]
        out = centred * scale
        return out + self.bias[None, :, None, None] if self.bias is not None else out


def for_export(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of `network` with every InstanceNorm2d (per-instance statistics) replaced by StableInstanceNorm2d."""
    copy = deepcopy(network)

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.InstanceNorm2d) and not child.track_running_stats:
                setattr(module, name, StableInstanceNorm2d(child))
            else:
                swap(child)

    swap(copy)
    return copy


def export_onnx(network: torch.nn.Module, path: Path, *, input_channels: int, tile_size: tuple[int, int]) -> Path:
    """Write `network` as ONNX (legacy TorchScript exporter: no onnxscript needed) and verify it with ONNX Runtime."""
    import onnx

    network = network.eval().float().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, input_channels, *tile_size)
    path = Path(path)
    with torch.no_grad():
        torch.onnx.export(
            for_export(network),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    if inline_shared_initializers(model.graph):
        onnx.save(model, str(path))
    onnx.checker.check_model(model)
    check_onnx_matches(network, path, input_channels=input_channels, tile_size=tile_size)
    return path


def inline_shared_initializers(graph) -> int:
    """Replace each Identity of an initializer by its own copy of that initializer; returns how many.

    The TorchScript exporter deduplicates equal initializers (e.g. every InstanceNorm weight still at
    its initial 1.0) into Identity nodes, placed after their first consumer; ONNX Runtime's graph
    optimiser then refuses the file ("... is not a graph input, initializer, or output of a previous
    node"). A copy per use costs a few kB.
    """
    import onnx

    initializers = {i.name: i for i in graph.initializer}
    shared = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    for node in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    return len(shared)


def check_onnx_matches(network: torch.nn.Module, path: Path, *, input_channels: int, tile_size: tuple[int, int]) -> float:
    """Max abs difference between torch and ONNX Runtime logits on a seeded batch of 3; raise if > 1e-3."""
    import onnxruntime

    sample = np.random.default_rng(0).normal(size=(3, input_channels, *tile_size)).astype(np.float32)
    with torch.no_grad():
        expected = network(torch.from_numpy(sample)).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: sample})[0]
    error = float(np.abs(got - expected).max())
    if error > 1e-3 * max(1.0, float(np.abs(expected).max())):
        raise RuntimeError(f"{path}: ONNX export differs from torch by {error:.3g}")
    return error
