"""The slice pipeline of model/segment.py on a torch device: CUDA in production, the CPU in tests.

Same algorithm, same answer (model/segment.py stays the reference): normalise, resample in-plane to the
model spacing (cubic, clipped as nnU-Net clips), pad, cut tiles at nnU-Net's sliding-window steps, run
them through the network in batches that span slices, blend the logits with the Gaussian importance
map, resample them back (linear) and take the argmax, all on the device in chunks of slices. The next
chunk's CT is copied to the device (pinned staging in a worker thread, non-blocking copy on a side
stream) while the current one computes, and the labels come back the same way one chunk later, so the
only synchronisation is that final copy.

How each step matches the numpy reference:
- normalisation: the same float32 operations in the same order (bit-exact);
- cubic in-plane resampling: scipy's zoom (order 3, prefilter, mode nearest, grid_mode) is linear and
  separable, so each slice becomes A_y @ (X @ A_x^T) with the reference's own float32 1D matrices
  (preprocess.resample.spline_matrix: an identity zoomed by that very scipy call), in the reference's
  order. The one place where values can differ is the summation order inside the matrix products
  (cuBLAS vs the host BLAS, about 1e-7 relative): a voxel changes label only where two logits are that
  close to a tie (tested: >= 99.9 % agreement; on the CPU device the labels came out identical);
- one tile per slice: the network's logits as they are (the Gaussian cancels), and no division by the
  weight sum without resampling back, as the reference does;
- tiles: gathered with one indexing kernel per batch; blending: index_add_ of the weighted tiles that
  share an offset (each slice once per offset, so no two threads add to one element: deterministic, and
  every element receives its tiles in the reference's order: bit-exact for the same tile logits);
- resampling back: the same two-tap gather-and-lerp as preprocess.resample, x first then y as the
  reference does on boundary pixels, over all channels; argmax takes the first maximum, as numpy does.

The network is a callable on device tensors: `network(batch)` with batch (B, channels, tile_y, tile_x)
float32 on `device`, returning (B, classes, tile_y, tile_x) logits of any float dtype on `device`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from model.package import ModelCard
from model.segment import SegmentStats, TilePlan, clip_bounds_per_slice, iter_chunks
from preprocess.resample import linear_taps, spline_matrix

DeviceNetwork = Callable[[torch.Tensor], torch.Tensor]

#: bytes of float32 logits per chunk of slices on a GPU (model grid plus the input grid when resampling back)
DEFAULT_DEVICE_CHUNK_BYTES = 1024**3
#: dtypes the device converts itself; others are converted to float32 on the host first
_UPLOADABLE = (np.float32, np.float64, np.int16, np.int32, np.uint8, np.int8)


class _Clock:
    """Seconds per stage: CUDA events on the compute stream (read once at the end), wall time on the CPU."""

    def __init__(self, device: torch.device, stats: SegmentStats):
        self.cuda = device.type == "cuda"
        self.stats = stats
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((stage, start, end))
        else:
            started = time.perf_counter()
            yield
            self.stats.seconds[stage] += time.perf_counter() - started

    def finish(self) -> None:
        for stage, start, end in self.events:
            end.synchronize()
            self.stats.seconds[stage] += start.elapsed_time(end) / 1000.0
        self.events.clear()


class _Uploader:
    """Copies chunks of the host volume to the device ahead of their use.

    On CUDA a worker thread stages each chunk in pinned memory and copies it on a side stream; the
    compute stream waits for that copy's event only when it needs the chunk, so chunk i+1 travels while
    chunk i computes. On the CPU it is a plain view.
    """

    def __init__(self, volume_zyx: np.ndarray, device: torch.device):
        if volume_zyx.dtype.type not in _UPLOADABLE:
            volume_zyx = volume_zyx.astype(np.float32)  # e.g. uint16: torch's support for it is partial
        self.volume = volume_zyx
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trunkseg-upload")

    def submit(self, part: slice) -> Future:
        if not self.cuda:
            done: Future = Future()
            done.set_result((torch.from_numpy(np.ascontiguousarray(self.volume[part])), None))
            return done
        return self.pool.submit(self._upload, part)

    def _upload(self, part: slice):
        pinned = torch.from_numpy(np.ascontiguousarray(self.volume[part])).pin_memory()
        with torch.cuda.stream(self.stream):
            on_device = pinned.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return on_device, copied

    def take(self, pending: Future) -> torch.Tensor:
        on_device, copied = pending.result()
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            on_device.record_stream(compute)  # the caching allocator must not reuse it before compute is done
        return on_device

    def close(self) -> None:
        if self.cuda:
            self.pool.shutdown(wait=True)


class _Downloader:
    """Brings each chunk's labels back to the host without stalling the next chunk's work (pinned, non-blocking)."""

    def __init__(self, labels_zyx: np.ndarray, device: torch.device):
        self.labels = labels_zyx
        self.cuda = device.type == "cuda"
        self.pending: tuple[slice, torch.Tensor, torch.cuda.Event] | None = None

    def put(self, part: slice, labels: torch.Tensor) -> None:
        if not self.cuda:
            self.labels[part] = labels.numpy()
            return
        host = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
        host.copy_(labels, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.flush()
        self.pending = (part, host, copied)

    def flush(self) -> None:
        if self.pending is not None:
            part, host, copied = self.pending
            copied.synchronize()
            self.labels[part] = host.numpy()
            self.pending = None


def segment_volume_device(
    volume_zyx: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float],
    card: ModelCard,
    network: DeviceNetwork,
    device: str | torch.device = "cuda",
    batch_size: int = 32,
    chunk_bytes: int = DEFAULT_DEVICE_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
    stats: SegmentStats | None = None,
    slice_spacing_mm: float | None = None,
) -> np.ndarray:
    """Label map (uint8, canonical label values) of a HU volume in the model's frame, computed on `device`.

    Arguments as model.segment.segment_volume, with `network` taking and returning device tensors.
    """
    if volume_zyx.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume_zyx.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    stats = stats if stats is not None else SegmentStats()
    clock = _Clock(device, stats)
    n_slices, height, width = volume_zyx.shape
    plan = TilePlan.of((height, width), pixel_spacing_mm=pixel_spacing_mm, card=card)
    tile, offsets, padded, pads = plan.tile_yx, plan.offsets, plan.padded_yx, plan.pads
    resample, model_shape = plan.resample, plan.model_shape_yx
    inverse_weight = torch.from_numpy(np.array(plan.inverse_weight)).to(device)
    gauss = torch.from_numpy(np.array(plan.gaussian)).to(device)
    n_classes = card.num_classes
    channel_labels = torch.as_tensor(card.channel_labels, dtype=torch.uint8, device=device)
    norm = card.normalization
    low_hu, high_hu = float(norm.clip_low), float(norm.clip_high)
    mean, inverse_std = float(np.float32(norm.mean)), float(np.float32(1.0 / norm.std))

    # one chunk: its logits on the model grid and, resampling back, the input grid (x first, then y)
    per_slice = n_classes * 4 * (padded[0] * padded[1] + (model_shape[0] * width + height * width if resample else 0))
    chunk = plan.chunk_slices(n_slices, bytes_per_slice=per_slice, chunk_bytes=chunk_bytes, batch_size=batch_size)

    if resample:
        a_y = torch.from_numpy(np.array(spline_matrix(height, model_shape[0], 3))).to(device)
        a_xt = torch.from_numpy(np.ascontiguousarray(spline_matrix(width, model_shape[1], 3).T)).to(device)
        ylo, yhi, wy = (torch.from_numpy(a).to(device) for a in linear_taps(model_shape[0], height))
        xlo, xhi, wx = (torch.from_numpy(a).to(device) for a in linear_taps(model_shape[1], width))
        wy = wy[:, None]
        per_slice_bounds = clip_bounds_per_slice(slice_spacing_mm, pixel_spacing_mm, card.pixel_spacing_mm)
        if not per_slice_bounds:  # normalisation is monotone: the volume's bounds from its HU extremes
            extremes = np.array([volume_zyx.min(), volume_zyx.max()], dtype=np.float32)
            volume_low, volume_high = ((np.clip(extremes, low_hu, high_hu) - np.float32(norm.mean)) * np.float32(1.0 / norm.std)).tolist()
    tile_rows = torch.arange(tile[0], device=device)
    tile_cols = torch.arange(tile[1], device=device)
    offsets_y = torch.tensor([y for y, _ in offsets], device=device)
    offsets_x = torch.tensor([x for _, x in offsets], device=device)

    single_tile, divide = plan.single_tile, plan.divide  # as the reference (TilePlan)

    labels = np.empty(volume_zyx.shape, dtype=np.uint8)
    parts = list(iter_chunks(n_slices, chunk))
    uploader = _Uploader(volume_zyx, device)
    downloader = _Downloader(labels, device)
    try:
        with torch.inference_mode():
            pending = uploader.submit(parts[0])
            for index, part in enumerate(parts):
                hu = uploader.take(pending)
                if index + 1 < len(parts):
                    pending = uploader.submit(parts[index + 1])
                n = part.stop - part.start

                with clock("normalize_resample"):
                    # out of place first: on the CPU device `hu` may be a view of the caller's volume
                    data = hu.to(torch.float32).clamp(low_hu, high_hu).sub_(mean).mul_(inverse_std)
                    if resample:
                        if per_slice_bounds:
                            low, high = data.amin(dim=(1, 2), keepdim=True), data.amax(dim=(1, 2), keepdim=True)
                        data = torch.matmul(a_y, torch.matmul(data, a_xt))  # along x, then y: the reference's order
                        if per_slice_bounds:
                            data = torch.maximum(torch.minimum(data, high), low)
                        else:
                            data.clamp_(volume_low, volume_high)
                    if plan.padding_needed:
                        data = torch.nn.functional.pad(data, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), value=0.0)
                    data = data.contiguous()

                logits = (torch.empty if single_tile else torch.zeros)((n, n_classes, *padded), dtype=torch.float32, device=device)
                n_jobs = n * len(offsets)
                for first in range(0, n_jobs, batch_size):
                    jobs = torch.arange(first, min(n_jobs, first + batch_size), device=device)
                    slice_of, offset_of = jobs // len(offsets), jobs % len(offsets)
                    rows = (offsets_y[offset_of][:, None] + tile_rows)[:, :, None]
                    cols = (offsets_x[offset_of][:, None] + tile_cols)[:, None, :]
                    with clock("network"):
                        batch = data[slice_of[:, None, None], rows, cols][:, None]
                        out = network(batch)
                    stats.network_calls += 1
                    stats.tiles += len(jobs)
                    with clock("blend"):
                        if out.shape != (len(jobs), n_classes, *tile):
                            raise RuntimeError(f"network returned {tuple(out.shape)}, expected {(len(jobs), n_classes, *tile)}")
                        if single_tile:  # one tile per slice, jobs in slice order
                            logits[first : first + len(jobs)] = out
                            continue
                        weighted = out.to(torch.float32) * gauss
                        # the batch's tiles of one offset lie len(offsets) apart and come from distinct slices;
                        # offsets in ascending order, so every pixel sums its tiles in the reference's order
                        for offset_index, (y, x) in enumerate(offsets):
                            k = (offset_index - first) % len(offsets)
                            if k >= len(jobs):
                                continue
                            members = torch.arange(k, len(jobs), len(offsets), device=device)
                            target = logits[:, :, y : y + tile[0], x : x + tile[1]]
                            target.index_add_(0, slice_of[members], weighted[members])

                with clock("resample_back_argmax"):
                    if divide:
                        logits.mul_(inverse_weight)
                    logits = logits[:, :, plan.window_yx[0], plan.window_yx[1]]
                    if resample:
                        logits = logits[..., xlo] * (1 - wx) + logits[..., xhi] * wx
                        logits = logits[..., ylo, :] * (1 - wy) + logits[..., yhi, :] * wy
                    chunk_labels = channel_labels[torch.argmax(logits, dim=1)]
                    del logits
                downloader.put(part, chunk_labels)
                if progress is not None:
                    progress(n)
            downloader.flush()
            clock.finish()
    finally:
        uploader.close()
    return labels
