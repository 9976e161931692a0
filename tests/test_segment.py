"""Tiling, blending, batching and resampling of the slice segmenter, with tiny networks whose answer is known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from model.package import ModelCard, Normalization
from model.segment import SegmentStats, TilePlan, compute_steps, gaussian_importance, padding_for, segment_volume
from preprocess.resample import resample_argmax, resample_linear, resample_slices, target_shape_yx

NORM = Normalization("CT", clip_low=-1000.0, clip_high=1000.0, mean=0.0, std=100.0)


def _card(**changes) -> ModelCard:
    card = ModelCard(
        name="test", version="0", description="", channel_labels=(0, 15), frame="LPS", pixel_spacing_mm=(1.0, 1.0),
        tile_size=(32, 32), normalization=NORM, network_class_name="none", arch_kwargs={},
    )
    return replace(card, **changes)


class ThresholdNetwork:
    """Logits (0, x): label wherever the normalised input is positive. Linear, so blending must be exact."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape[0])
        return np.concatenate([np.zeros_like(batch), batch], axis=1)


def test_steps_match_nnunet_sliding_window():
    # values from nnU-Net's compute_steps_for_sliding_window
    assert compute_steps((512, 512), (256, 256), 0.5) == [[0, 128, 256], [0, 128, 256]]
    assert compute_steps((300, 256), (256, 256), 0.5) == [[0, 44], [0]]
    assert compute_steps((600,), (256,), 0.5) == [[0, 115, 229, 344]]


def test_gaussian_importance_is_nnunets():
    gauss = gaussian_importance((32, 32))
    assert gauss.max() == pytest.approx(10.0)
    assert gauss.min() > 0
    assert np.unravel_index(np.argmax(gauss), gauss.shape) == (16, 16)
    np.testing.assert_allclose(gauss[16, 1:], gauss[16, 1:][::-1], rtol=1e-6)


def test_padding_centres_small_slices():
    assert padding_for((20, 40), (32, 32)) == ((6, 6), (0, 0))
    assert padding_for((21, 32), (32, 32)) == ((5, 6), (0, 0))


class WritingThresholdNetwork(ThresholdNetwork):
    """ThresholdNetwork that can also write its logits into the caller's array (as OpenVinoRunner.infer_into)."""

    def __init__(self):
        super().__init__()
        self.written = 0

    def infer_into(self, batch: np.ndarray, out: np.ndarray) -> None:
        self.written += batch.shape[0]
        out[...] = self(batch)


@pytest.mark.parametrize("shape, spacing", [((5, 30, 30), 0.9), ((4, 70, 90), 1.0)], ids=["one-tile", "tiled"])
def test_a_network_that_writes_into_the_buffer_gives_the_same_labels(shape, spacing):
    volume = ndimage.gaussian_filter(np.random.default_rng(7).normal(0, 300, shape), (0, 3, 3)).astype(np.float32)
    writing, plain = WritingThresholdNetwork(), ThresholdNetwork()
    got = segment_volume(volume, pixel_spacing_mm=(spacing, spacing), card=_card(), network=writing, batch_size=2)
    expected = segment_volume(volume, pixel_spacing_mm=(spacing, spacing), card=_card(), network=plain, batch_size=2)
    np.testing.assert_array_equal(got, expected)
    assert writing.written == (shape[0] if shape[1] < 32 else 0)  # used for one tile per slice only


@pytest.mark.parametrize("shape, spacing", [((9, 30, 30), 0.9), ((7, 70, 90), 0.8)], ids=["one-tile-resampled", "tiled-resampled"])
def test_argmax_overlapped_with_the_network_gives_the_same_labels_and_progress(shape, spacing):
    volume = ndimage.gaussian_filter(np.random.default_rng(8).normal(0, 300, shape), (0, 3, 3)).astype(np.float32)
    chunk_bytes = 2 * 3 * 2 * 32 * 32 * 4 * 4  # a few slices per chunk, so that several chunks overlap
    done = {True: [], False: []}
    got = {overlap: segment_volume(volume, pixel_spacing_mm=(spacing, spacing), card=_card(), network=ThresholdNetwork(), batch_size=2,
                                   chunk_bytes=chunk_bytes, progress=done[overlap].append, overlap=overlap) for overlap in (True, False)}
    np.testing.assert_array_equal(got[True], got[False])
    assert sum(done[True]) == sum(done[False]) == shape[0] and len(done[True]) > 1


def test_tile_plan_pads_tiles_and_weights_a_slice_as_nnunet():
    plan = TilePlan.of((20, 40), pixel_spacing_mm=(1.0, 1.0), card=_card())
    assert not plan.resample and plan.model_shape_yx == (20, 40) and plan.pads == ((6, 6), (0, 0)) and plan.padded_yx == (32, 40)
    assert plan.offsets == ((0, 0), (0, 8)) and not plan.single_tile and not plan.divide
    window = np.zeros(plan.padded_yx, bool)
    window[plan.window_yx] = True
    assert window.sum() == 20 * 40 and window[6:26].all()
    total = np.zeros(plan.padded_yx)  # the Gaussians summed over the tiles, times inverse_weight, is 1 everywhere
    for y, x in plan.offsets:
        total[y : y + 32, x : x + 32] += plan.gaussian
    np.testing.assert_allclose(total * plan.inverse_weight, 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        plan.inverse_weight[0, 0] = 1.0  # read-only: one plan may serve several volumes


def test_tile_plan_resamples_and_covers_one_tile():
    plan = TilePlan.of((30, 30), pixel_spacing_mm=(0.9, 0.9), card=_card())
    assert plan.resample and plan.model_shape_yx == (27, 27) and plan.padded_yx == (32, 32) and plan.single_tile and not plan.divide
    assert plan.chunk_slices(100, bytes_per_slice=10, chunk_bytes=95, batch_size=4) == 8  # 9 fit, rounded to whole batches of 4 tiles
    several = TilePlan.of((70, 90), pixel_spacing_mm=(1.0, 1.0), card=_card())
    assert len(several.offsets) == 4 * 5 and several.chunk_slices(100, bytes_per_slice=10, chunk_bytes=1000, batch_size=16) == 100


def test_a_chunk_budget_below_one_batch_keeps_the_slices_it_holds_not_one():
    """Found on the H200 (docs/benchmarks.md): 25 slices fit the budget, batch 32 rounded that down to 0, then 1
    slice a chunk, a network call a slice (6.4 ms a slice at batch 32 against 1.0 ms at batch 8)."""
    plan = TilePlan.of((30, 30), pixel_spacing_mm=(0.9, 0.9), card=_card())
    assert plan.single_tile
    assert plan.chunk_slices(300, bytes_per_slice=41_404_416, chunk_bytes=1024**3, batch_size=32) == 25  # the demo model's figures
    assert plan.chunk_slices(300, bytes_per_slice=41_404_416, chunk_bytes=1024**3, batch_size=8) == 24  # whole batches where possible
    assert plan.chunk_slices(300, bytes_per_slice=10, chunk_bytes=5, batch_size=32) == 1  # less than a slice: still one


@pytest.mark.parametrize("shape", [(3, 70, 90), (2, 20, 25), (4, 32, 32)], ids=["tiled", "padded", "exact"])
def test_linear_network_gives_exact_threshold_through_tiles_and_blending(shape):
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.normal(0, 300, shape), (0, 3, 3)).astype(np.float32)
    labels = segment_volume(volume, pixel_spacing_mm=(1.0, 1.0), card=_card(), network=ThresholdNetwork(), batch_size=3)
    np.testing.assert_array_equal(labels, np.where(volume > 0, 15, 0).astype(np.uint8))


def test_batches_span_slices_and_are_full():
    network = ThresholdNetwork()
    stats = SegmentStats()
    volume = np.zeros((5, 70, 90), np.float32)  # 4 x 5 tiles per slice = 100 tiles
    segment_volume(volume, pixel_spacing_mm=(1.0, 1.0), card=_card(), network=network, batch_size=8, stats=stats)
    assert stats.tiles == 100 == sum(network.batches)
    assert network.batches[:-1] == [8] * (len(network.batches) - 1)  # only the last batch may be partial


def test_small_memory_budget_gives_the_same_labels():
    rng = np.random.default_rng(1)
    volume = ndimage.gaussian_filter(rng.normal(0, 300, (7, 50, 60)), (0, 2, 2)).astype(np.float32)
    card = _card()
    whole = segment_volume(volume, pixel_spacing_mm=(1.0, 1.0), card=card, network=ThresholdNetwork())
    chunked = segment_volume(volume, pixel_spacing_mm=(1.0, 1.0), card=card, network=ThresholdNetwork(), chunk_bytes=1)
    np.testing.assert_array_equal(whole, chunked)


def test_resampling_to_model_spacing_and_back_keeps_a_smooth_shape():
    """A disc at 0.7 mm, model at 1.5 mm: the mask comes back on the 0.7 mm grid, same disc (edges may move < 1 model pixel)."""
    yy, xx = np.mgrid[:200, :180]
    disc = (((yy - 90) * 0.7) ** 2 + ((xx - 100) * 0.7) ** 2) < 30**2
    volume = np.where(disc, 200.0, -200.0).astype(np.float32)[None].repeat(2, 0)
    labels = segment_volume(volume, pixel_spacing_mm=(0.7, 0.7), card=_card(pixel_spacing_mm=(1.5, 1.5)), network=ThresholdNetwork())
    assert labels.shape == volume.shape
    dice = 2 * np.sum((labels[0] > 0) & disc) / (np.sum(labels[0] > 0) + disc.sum())
    assert dice > 0.98


def test_channel_labels_map_channels_to_canonical_values():
    volume = np.full((1, 32, 32), 50.0, np.float32)
    labels = segment_volume(volume, pixel_spacing_mm=(1.0, 1.0), card=_card(channel_labels=(0, 7)), network=ThresholdNetwork())
    assert set(np.unique(labels)) == {7}


def test_resample_argmax_equals_argmax_of_resampled_logits():
    rng = np.random.default_rng(3)
    logits = ndimage.gaussian_filter(rng.normal(size=(3, 6, 40, 37)), (0, 0, 3, 3)).astype(np.float32)
    expected = np.argmax(resample_linear(logits, (97, 80)), axis=1)
    got = resample_argmax(logits, (97, 80))
    assert np.mean(got == expected) > 0.9999  # differences only at float-rounding ties


def test_resample_argmax_is_exact_against_the_same_float32_interpolation_of_every_channel():
    # oracle: every channel interpolated (x first, then y, float32, as the boundary pass does), then np.argmax;
    # quantised logits make exact ties, where the first maximum must win as in np.argmax
    from preprocess.resample import linear_taps

    rng = np.random.default_rng(5)
    logits = np.round(ndimage.gaussian_filter(rng.normal(size=(2, 7, 33, 41)), (0, 0, 2, 2)) * 8).astype(np.float32) / 8
    for shape in ((70, 90), (20, 25), (33, 60)):
        ylo, yhi, fy = linear_taps(33, shape[0])
        xlo, xhi, fx = linear_taps(41, shape[1])
        rows_lo, rows_hi = logits[:, :, ylo], logits[:, :, yhi]
        top = rows_lo[..., xlo] * (1 - fx) + rows_lo[..., xhi] * fx
        bottom = rows_hi[..., xlo] * (1 - fx) + rows_hi[..., xhi] * fx
        expected = np.argmax(top * (1 - fy)[:, None] + bottom * fy[:, None], axis=1)
        np.testing.assert_array_equal(resample_argmax(logits, shape), expected)


def test_resample_argmax_of_a_window_equals_that_of_the_cropped_logits():
    rng = np.random.default_rng(6)
    padded = ndimage.gaussian_filter(rng.normal(size=(2, 5, 40, 44)), (0, 0, 2, 2)).astype(np.float32)
    window = (slice(3, 36), slice(5, 42))
    cropped = np.ascontiguousarray(padded[:, :, window[0], window[1]])
    for shape in ((60, 70), (33, 37), (20, 18)):
        np.testing.assert_array_equal(resample_argmax(padded, shape, window_yx=window), resample_argmax(cropped, shape))
    with pytest.raises(ValueError, match="not inside"):
        resample_argmax(padded, (10, 10), window_yx=(slice(0, 41), slice(0, 10)))


def test_separable_linear_resampling_equals_scipy_zoom_order_1():
    stack = np.random.default_rng(4).normal(size=(2, 23, 31)).astype(np.float32)
    np.testing.assert_allclose(resample_linear(stack, (50, 17)), resample_slices(stack, (50, 17), order=1), atol=1e-5)


def test_target_shape_rounds_like_nnunet():
    assert target_shape_yx((512, 512), (0.7, 0.7), (1.5, 1.5)) == (239, 239)
    assert target_shape_yx((100, 200), (1.0, 2.0), (2.0, 2.0)) == (100, 100)  # (y, x) shape, (x, y) spacing
