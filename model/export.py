"""Export a network to ONNX with a dynamic batch axis (fixed tile shape), and check the export.

Input "image": (batch, channels, tile_y, tile_x) float32; output "logits": (batch, classes, tile_y, tile_x).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.package import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def export_onnx(network: torch.nn.Module, path: Path, *, input_channels: int, tile_size: tuple[int, int]) -> Path:
    """Write `network` as ONNX (legacy TorchScript exporter: no onnxscript needed) and verify it with ONNX Runtime."""
    import onnx

    network = network.eval().float().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, input_channels, *tile_size)
    path = Path(path)
    with torch.no_grad():
        torch.onnx.export(
            network,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    check_onnx_matches(network, path, input_channels=input_channels, tile_size=tile_size)
    return path


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
