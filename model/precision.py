"""Measuring a reduced precision's agreement with fp32 on a model, and recording it in the model card.

The mode's labels against the fp32 labels of the same weights (ONNX Runtime fp32, the reference every
other test compares with nnU-Net), through the real segmenter, on phantoms and real CT. A mode holds
when the voxel agreement is >= 99.9 % and every label with >= 100 voxels has Dice >= 0.99; which mode
then runs is model/runtimes/precision.py's choice.

    python -m model.precision PKG [--ct FILE ...] [--modes openvino-bf16 openvino-int8 openvino-int8+bf16 onnxruntime-int8] [--write]

measures (and with --write records in the card, checksums rewritten) the agreement of each mode.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.package import ModelCard, ModelPackage, load_model_package, write_model_card
from model.runtimes.precision import cpu_has_native_bf16

MIN_VOXEL_AGREEMENT = 0.999
MIN_DICE = 0.99
MIN_VOXELS_FOR_DICE = 100
#: the phantoms agreement is measured on (held out from the int8 calibration seeds in model/quantize.py)
AGREEMENT_SEEDS = (424_242, 424_243, 424_244)


# --- measuring agreement -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Volume:
    """A CT in the model's frame, with what the segmenter needs to know of its spacing."""

    name: str
    volume_zyx: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float


def phantom_volumes(card: ModelCard, *, seeds=AGREEMENT_SEEDS, n_slices: int = 13) -> list[Volume]:
    """Phantoms around the model's pixel spacing (one finer, one coarser, one equal), 13 slices T4-L4 each."""
    from model.phantom import make_phantom

    out = []
    factors = (0.8, 1.0, 1.25)
    for seed, factor in zip(seeds, factors):
        spacing = tuple(float(s) * factor for s in card.pixel_spacing_mm)
        # a field of view of about 384 mm, like a trunk CT, whatever the spacing
        size = tuple(int(round(384 / s)) for s in spacing)
        phantom = make_phantom(seed, size_xy=size, spacing_mm=(*spacing, 3.0), n_slices=n_slices)
        out.append(Volume(f"phantom-{seed}", phantom.ct_zyx, spacing, float(phantom.geometry.spacing_mm[2])))
    return out


def ct_volumes(paths: list[Path], card: ModelCard, *, max_slices: int = 24) -> list[Volume]:
    """Real CT files (or DICOM folders) in the model's frame; at most `max_slices` evenly spaced slices each."""
    from preprocess.geometry import Reorientation
    from preprocess.io import read_ct

    out = []
    for path in paths:
        volume, geometry = read_ct(Path(path))
        reorientation = Reorientation.between(geometry, card.frame)
        model_frame = reorientation.apply(volume)
        keep = np.unique(np.linspace(0, model_frame.shape[0] - 1, min(max_slices, model_frame.shape[0])).round().astype(int))
        out.append(Volume(Path(path).name, np.ascontiguousarray(model_frame[keep]), tuple(reorientation.spacing_mm[:2]),
                          float(reorientation.spacing_mm[2])))
    return out


def dice_per_label(a: np.ndarray, b: np.ndarray, *, min_voxels: int = MIN_VOXELS_FOR_DICE) -> dict[int, float]:
    """Dice of each non-zero label present with >= min_voxels in either map (np.bincount over the label pairs)."""
    n = int(max(a.max(initial=0), b.max(initial=0))) + 1
    size_a = np.bincount(a.ravel(), minlength=n)
    size_b = np.bincount(b.ravel(), minlength=n)
    both = np.bincount(a[a == b].ravel(), minlength=n)
    return {int(v): float(2 * both[v] / (size_a[v] + size_b[v])) for v in range(1, n) if max(size_a[v], size_b[v]) >= min_voxels}


def segment_all(volumes: list[Volume], package: ModelPackage, runner, *, batch_size: int = 1) -> tuple[list[np.ndarray], float]:
    from model.segment import segment_volume

    started = time.perf_counter()
    labels = [segment_volume(v.volume_zyx, pixel_spacing_mm=v.pixel_spacing_mm, card=package.card, network=runner,
                             batch_size=batch_size, slice_spacing_mm=v.slice_spacing_mm) for v in volumes]
    return labels, time.perf_counter() - started


def agreement_of(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    ref = np.concatenate([r.ravel() for r in reference])
    got = np.concatenate([c.ravel() for c in candidate])
    dice = dice_per_label(ref, got)
    voxels = float((ref == got).mean())
    min_dice = min(dice.values()) if dice else float("nan")
    return {"holds": bool(voxels >= MIN_VOXEL_AGREEMENT and dice and min_dice >= MIN_DICE),
            "voxel_agreement": round(voxels, 7), "min_dice": round(min_dice, 5), "labels_compared": len(dice)}


def open_runner(key: str, package: ModelPackage, *, threads: int | None):
    from model.runtimes.cpu import OnnxRuntimeRunner, OpenVinoRunner, TorchRunner

    runtime, precision = key.rsplit("-", 1)
    if runtime == "openvino":
        return OpenVinoRunner(package, threads=threads, precision=precision)
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(package, threads=threads, precision=precision)
    if runtime == "torch-cpu":
        return TorchRunner(package, device="cpu", precision=precision, threads=threads)
    raise ValueError(f"unknown runner {key!r} (runtime-precision, e.g. openvino-bf16)")


def measure_agreement(package: ModelPackage, volumes: list[Volume], modes: list[str], *, threads: int | None = None,
                      log=lambda message: None) -> dict[str, dict]:
    """Agreement of each mode ("openvino-bf16", ...) with ONNX Runtime fp32 on `volumes`, as card records."""
    with open_runner("onnxruntime-fp32", package, threads=threads) as runner:
        reference, seconds = segment_all(volumes, package, runner)
    log(f"onnxruntime-fp32 (reference): {seconds:.1f} s")
    versions = runtime_versions()
    records = {}
    for key in modes:
        with open_runner(key, package, threads=threads) as runner:
            labels, seconds = segment_all(volumes, package, runner)
        record = agreement_of(reference, labels)
        record["per_volume"] = {v.name: {k: agreement_of([r], [c])[k] for k in ("voxel_agreement", "min_dice")}
                                for v, r, c in zip(volumes, reference, labels)}
        record.update({
            "reference": "onnxruntime-fp32", "data": ", ".join(f"{v.name} ({v.volume_zyx.shape[0]} slices)" for v in volumes),
            "measured_with": versions.get(key.rsplit("-", 1)[0], ""), "machine": f"{platform.machine()}, bf16 native: {cpu_has_native_bf16()}",
        })
        records[key] = record
        log(f"{key}: {seconds:.1f} s, voxels {100 * record['voxel_agreement']:.4f} %, min Dice {record['min_dice']:.4f} "
            f"over {record['labels_compared']} labels -> {'holds' if record['holds'] else 'does NOT hold'}")
    return records


def runtime_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for runtime, dist in (("openvino", "openvino"), ("onnxruntime", "onnxruntime"), ("torch-cpu", "torch")):
        try:
            out[runtime] = f"{dist} {version(dist)}"
        except PackageNotFoundError:
            pass
    return out


def record_agreement(folder: Path, records: dict[str, dict]) -> Path:
    """Merge `records` into the package's card (precision_agreement) and rewrite its checksums."""
    package = load_model_package(folder)
    card = replace(package.card, precision_agreement={**package.card.precision_agreement, **records})
    return write_model_card(card, folder)


def default_modes(package: ModelPackage) -> list[str]:
    import importlib.util

    modes = []
    if importlib.util.find_spec("openvino") is not None:
        modes += ["openvino-bf16"] if cpu_has_native_bf16() else []
        if "onnx_int8" in package.card.files:
            modes += ["openvino-int8", "openvino-int8+bf16"] if cpu_has_native_bf16() else ["openvino-int8"]
    if "onnx_int8" in package.card.files:
        modes.append("onnxruntime-int8")
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--ct", type=Path, nargs="*", default=[], help="real CT files or DICOM folders to include")
    parser.add_argument("--modes", nargs="+", default=None, help="runner-precision keys (default: every reduced mode this machine and package have)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", action="store_true", help="record the results in the model card")
    args = parser.parse_args(argv)
    from common.errors import TrunkSegError

    try:
        package = load_model_package(args.package)
        modes = args.modes or default_modes(package)
        if not modes:
            print("error: no reduced-precision mode to measure on this machine / package", file=sys.stderr)
            return 2
        volumes = phantom_volumes(package.card) + ct_volumes(args.ct, package.card)
        records = measure_agreement(package, volumes, modes, threads=args.threads, log=lambda m: print(m, file=sys.stderr))
        if args.write:
            print(f"recorded in {record_agreement(args.package, records)}", file=sys.stderr)
    except TrunkSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
