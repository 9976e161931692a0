"""int8 export of a model package: ONNX Runtime static quantization of the convolutions (QDQ format).

    python -m model.quantize PKG [--ct FILE ...] [--check]

Weights int8 per output channel (symmetric), activations uint8 per tensor, calibrated on tiles of
real network inputs: phantom slices at and around the model's spacing and, with --ct, real CT slices,
prepared exactly as the segmenter prepares them (nnU-Net normalisation, cubic resampling, padding).
Only Conv and ConvTranspose are quantized; the InstanceNorms (exported as plain reductions), the
LeakyReLUs and the last 1x1 convolution (the logits) stay float32. The result is `model.int8.onnx`,
listed in the card as the "onnx_int8" file; ONNX Runtime and OpenVINO both run it (`--precision int8`).
With --check, its agreement with fp32 is measured and recorded (model/precision.py), so that
`--precision auto` only uses it where it holds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from model.package import INPUT_NAME, ModelCard, load_model_package, write_model_card
from model.runtimes.precision import onnx_role

INT8_FILE = "model.int8.onnx"
#: phantoms for calibration (the agreement check uses other seeds: model/precision.py AGREEMENT_SEEDS)
CALIBRATION_SEEDS = (515_151, 515_152, 515_153, 515_154)


def calibration_tiles(card: ModelCard, volumes, *, max_tiles: int = 48, seed: int = 0) -> np.ndarray:
    """(k, channels, tile_y, tile_x) float32 network inputs cut from `volumes` (precision.Volume), as the segmenter cuts them."""
    from model.segment import compute_steps, padding_for
    from preprocess.intensity import normalize_ct
    from preprocess.resample import needs_resampling, resample_slices, target_shape_yx

    norm = card.normalization
    tile = tuple(card.tile_size)
    tiles = []
    for volume in volumes:
        data = normalize_ct(volume.volume_zyx, clip_low=norm.clip_low, clip_high=norm.clip_high, mean=norm.mean, std=norm.std)
        if needs_resampling(volume.pixel_spacing_mm, card.pixel_spacing_mm):
            shape = target_shape_yx(data.shape[1:], volume.pixel_spacing_mm, card.pixel_spacing_mm)
            low, high = data.min(axis=(1, 2))[:, None, None], data.max(axis=(1, 2))[:, None, None]
            data = np.clip(resample_slices(data, shape, order=3), low, high)
        pads = padding_for(data.shape[1:], tile)
        data = np.pad(data, ((0, 0), *pads), mode="constant", constant_values=0)
        steps = compute_steps(data.shape[1:], tile, card.tile_step_size)
        tiles += [data[s, y : y + tile[0], x : x + tile[1]] for s in range(data.shape[0]) for y in steps[0] for x in steps[1]]
    tiles = np.stack(tiles)[:, None].astype(np.float32)
    if len(tiles) > max_tiles:  # evenly over all volumes and slices, reproducibly
        tiles = tiles[np.sort(np.random.default_rng(seed).choice(len(tiles), max_tiles, replace=False))]
    return np.repeat(tiles, card.input_channels, axis=1) if card.input_channels > 1 else tiles


def logits_conv_names(path: Path) -> list[str]:
    """Names of the Conv nodes whose output is the graph output (the segmentation layer), kept float32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    return [node.name for node in model.graph.node if node.op_type == "Conv" and set(node.output) & outputs]


def quantize_onnx(source: Path, target: Path, tiles: np.ndarray) -> Path:
    """Static QDQ quantization of `source`'s convolutions, calibrated (min/max) on `tiles`, one tile per step."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Tiles(CalibrationDataReader):
        def __init__(self):
            self.items = iter(tiles[i : i + 1] for i in range(len(tiles)))

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {INPUT_NAME: item}

    quantize_static(
        str(source), str(target), Tiles(),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "ConvTranspose"], nodes_to_exclude=logits_conv_names(source),
        calibrate_method=CalibrationMethod.MinMax,
    )
    return target


def quantize_package(folder: Path, *, ct: list[Path] = (), log=lambda message: None) -> Path:
    """Write the package's int8 ONNX and list it in the card (checksums rewritten); returns its path."""
    from model.precision import ct_volumes, phantom_volumes

    folder = Path(folder)
    package = load_model_package(folder)
    card = package.card
    volumes = phantom_volumes(card, seeds=CALIBRATION_SEEDS[:3]) + ct_volumes(list(ct), card, max_slices=12)
    tiles = calibration_tiles(card, volumes)
    log(f"calibrating on {len(tiles)} tiles from {len(volumes)} volumes")
    target = quantize_onnx(package.path_of("onnx"), folder / INT8_FILE, tiles)
    # a new int8 file: the records of every mode that runs it are void
    records = {k: v for k, v in card.precision_agreement.items() if onnx_role(k.rsplit("-", 1)[1]) != "onnx_int8"}
    write_model_card(replace(card, files={**card.files, "onnx_int8": {"path": INT8_FILE}}, precision_agreement=records), folder)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--ct", type=Path, nargs="*", default=[], help="real CT files or DICOM folders for calibration")
    parser.add_argument("--check", action="store_true", help="measure and record the int8 agreement with fp32")
    args = parser.parse_args(argv)
    from common.errors import TrunkSegError

    try:
        target = quantize_package(args.package, ct=args.ct, log=lambda m: print(m, file=sys.stderr))
        print(f"wrote {target}", file=sys.stderr)
        if args.check:
            from model.precision import default_modes
            from model.precision import main as precision_main

            modes = [mode for mode in default_modes(load_model_package(args.package)) if "int8" in mode]
            return precision_main([str(args.package), "--write", "--modes", *modes, *(["--ct", *map(str, args.ct)] if args.ct else [])])
    except TrunkSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
