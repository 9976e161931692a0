"""The runner contract: a context manager that is a callable `batch -> logits`, with named, checked input and output.

Every runtime checks its named input and output the way Polygraphy's runners do: input "image" float32
(batch, channels, tile_y, tile_x), output "logits" float32 (batch, classes, tile_y, tile_x). What a
runner can do beyond that is typed here, not found by getattr: a runner that writes into the caller's
buffer is a `WritesInto`, one that runs the whole slice pipeline on its device is a `DevicePipeline`,
and `preferred_batch_size` (None: the caller's default) is part of every runner.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from model.package import INPUT_NAME, OUTPUT_NAME


@runtime_checkable
class Runner(Protocol):
    name: str
    #: tiles per call this runner is fastest with (measured, docs/benchmarks.md), or None for the caller's default
    preferred_batch_size: int | None

    def __enter__(self) -> "Runner": ...

    def __exit__(self, *exc) -> None: ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class WritesInto(Protocol):
    """A runner that writes the logits into a caller's float32 C-contiguous array (the segmenter's buffer), no copy."""

    def infer_into(self, batch: np.ndarray, out: np.ndarray) -> None: ...


@runtime_checkable
class DevicePipeline(Protocol):
    """A GPU runner: the segmenter runs on its device (model/segment_torch.py) and calls `run_device` with device tensors."""

    device: object

    def run_device(self, batch): ...


def check_batch(batch: np.ndarray, channels: int, tile: tuple[int, int], who: str) -> None:
    if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
        raise TypeError(f"{who}: input {INPUT_NAME!r} must be a float32 numpy array, got {getattr(batch, 'dtype', type(batch))}")
    if batch.ndim != 4 or batch.shape[1] != channels or tuple(batch.shape[2:]) != tuple(tile):
        raise ValueError(f"{who}: input {INPUT_NAME!r} must be (batch, {channels}, {tile[0]}, {tile[1]}), got {batch.shape}")


def check_logits(logits: np.ndarray, batch: np.ndarray, classes: int, who: str) -> np.ndarray:
    expected = (batch.shape[0], classes, *batch.shape[2:])
    if logits.shape != expected:
        raise RuntimeError(f"{who}: output {OUTPUT_NAME!r} has shape {logits.shape}, expected {expected}")
    return logits if logits.dtype == np.float32 else logits.astype(np.float32)


def check_output_buffer(out: np.ndarray, expected: tuple[int, ...], who: str) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise TypeError(f"{who}: the buffer for output {OUTPUT_NAME!r} must be a writable C-contiguous float32 numpy array")
    if out.shape != expected:
        raise ValueError(f"{who}: the buffer for output {OUTPUT_NAME!r} must be {expected}, got {out.shape}")
