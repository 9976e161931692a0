"""Measure a model package on held-out phantoms through the real pipeline, and record it in the model card.

    python -m training.evaluate_demo model/packages/demo-phantom

Held-out phantoms use seeds 900000+ (training uses seed*100000 + case with seed 7: 700000-700299), at
several in-plane and slice spacings, stored in several axis frames, so that reorientation and
in-plane resampling are part of what is measured. Dice is reported dense (every voxel, 3D) and sparse
(only the 13 mid-level slices, as the evaluation container scores real data).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.labels import LABELS
from model.package import load_model_package, write_model_card
from model.runtimes.cpu import OnnxRuntimeRunner
from model.segment import segment_volume
from preprocess.geometry import Reorientation
from model.phantom import make_phantom

HELD_OUT = [
    (900_001, (512, 512), (0.8, 0.8, 3.0)),
    (900_002, (400, 360), (1.0, 1.0, 2.5)),
    (900_003, (256, 240), (1.5, 1.5, 5.0)),
    (900_004, (300, 280), (1.25, 1.25, 4.0)),
]


def dice_per_label(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    n = len(LABELS) + 1
    agree = np.bincount(truth[pred == truth].ravel(), minlength=n)
    sizes = np.bincount(pred.ravel(), minlength=n)[:n] + np.bincount(truth.ravel(), minlength=n)[:n]
    return {name: float(2 * agree[v] / sizes[v]) for name, v in LABELS.items() if sizes[v] > 0}


def evaluate(package_dir: Path, *, threads: int = 2) -> dict:
    package = load_model_package(package_dir)
    dense_all, sparse_all, seconds, slices = [], [], 0.0, 0
    with OnnxRuntimeRunner(package, threads=threads) as runtime:
        for seed, size, spacing in HELD_OUT:
            phantom = make_phantom(seed, size_xy=size, spacing_mm=spacing)
            reorientation = Reorientation.between(phantom.geometry, package.card.frame)
            started = time.perf_counter()
            pred = reorientation.invert(
                segment_volume(reorientation.apply(phantom.ct_zyx), pixel_spacing_mm=reorientation.spacing_mm[:2], card=package.card, network=runtime)
            )
            seconds += time.perf_counter() - started
            slices += pred.shape[0]
            dense = dice_per_label(pred, phantom.labels_zyx)
            mids = phantom.mid_slices
            sparse = dice_per_label(pred[mids], phantom.labels_zyx[mids])
            dense_all.append(dense)
            sparse_all.append(sparse)
            print(f"seed {seed} {size} {spacing}: dense mean Dice {np.mean(list(dense.values())):.3f}, sparse {np.mean(list(sparse.values())):.3f}")

    def summarize(rows):
        per_muscle = {name: round(float(np.mean([r[name] for r in rows if name in r])), 4) for name in LABELS}
        return {"mean": round(float(np.mean(list(per_muscle.values()))), 4), "min": round(min(per_muscle.values()), 4), "per_muscle": per_muscle}

    return {
        "held_out_phantoms": {
            "cases": [{"seed": s, "size_xy": list(z), "spacing_mm": list(p)} for s, z, p in HELD_OUT],
            "dice_dense_3d": summarize(dense_all),
            "dice_sparse_mid_level_slices": summarize(sparse_all),
            "onnxruntime_ms_per_slice": round(1000 * seconds / slices, 1),
            "measured_by": "python -m training.evaluate_demo",
        }
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print the metrics, leave the card as it is")
    args = parser.parse_args()
    metrics = evaluate(args.package, threads=args.threads)
    print(json.dumps(metrics, indent=1))
    if not args.dry_run:
        package = load_model_package(args.package)
        write_model_card(replace(package.card, metrics=metrics), args.package)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
