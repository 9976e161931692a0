"""Train the demo model package on synthetic phantoms, the way the paper trains: sparse annotations only.

Every training slice is a level mid-slice (T4-L4) of a random phantom, exactly what a reader would
annotate; no other slice is ever seen. Seeded and reproducible on the CPU (torch bf16 autocast with
channels_last, Adam, Dice + cross-entropy as in nnU-Net, poly learning-rate decay).

    python -m training.train_demo --out model/packages/demo-phantom

Then `python -m training.evaluate_demo model/packages/demo-phantom` measures it on held-out phantoms
through the real pipeline and writes the figures into the model card.

The weights know only phantoms. They are not a model of real anatomy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from model.export import export_onnx
from common.labels import IGNORE, LABELS, NUM_CLASSES
from model.network import build_network, plain_unet_kwargs
from model.package import ModelCard, Normalization, write_model_card
from model.phantom import make_annotated_slices

NETWORK = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
FEATURES = [16, 32, 64, 128, 128, 128]
STRIDES = [1, 2, 2, 2, 2, 2]
TILE = (256, 256)
PIXEL_SPACING_MM = 1.5


def make_pool(n_cases: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Annotated slices of `n_cases` random phantoms, at random pixel spacing around the model's (size variety)."""
    rng = np.random.default_rng(seed)
    cts, labels = [], []
    for case in range(n_cases):
        spacing = PIXEL_SPACING_MM * rng.uniform(0.88, 1.12)
        ct, lab = make_annotated_slices(seed * 100_000 + case, size_xy=TILE[::-1], pixel_spacing_mm=spacing)
        shift = rng.integers(-16, 17, 2)  # off-centre patients
        cts.append(np.roll(ct, tuple(shift), axis=(1, 2)))
        labels.append(np.roll(lab, tuple(shift), axis=(1, 2)))
    return np.concatenate(cts), np.concatenate(labels)


def foreground_normalization(ct: np.ndarray, labels: np.ndarray, seed: int) -> Normalization:
    """nnU-Net's CT numbers: 0.5/99.5 percentiles, mean and std of labelled (foreground) voxels."""
    values = ct[(labels > 0) & (labels != IGNORE)].astype(np.float64)
    values = np.random.default_rng(seed).choice(values, size=min(values.size, 10_000_000), replace=False)
    low, high = np.percentile(values, [0.5, 99.5])
    return Normalization("CT", float(low), float(high), float(values.mean()), float(values.std()))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice (batch, foreground classes, annotated pixels only) + cross-entropy, as nnU-Net's DC_and_CE."""
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)
    valid = (target != IGNORE).unsqueeze(1)
    probs = torch.softmax(logits, 1) * valid
    onehot = torch.nn.functional.one_hot(torch.where(target == IGNORE, 0, target), NUM_CLASSES).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    intersect = (probs * onehot).sum(dims)[1:]
    denominator = (probs.sum(dims) + onehot.sum(dims))[1:]
    dice = (2 * intersect + 1e-5) / (denominator + 1e-5)
    return ce - dice.mean()


def train(out: Path, *, iterations: int, batch: int, n_cases: int, seed: int, threads: int) -> Path:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    ct, labels = make_pool(n_cases, seed)
    norm = foreground_normalization(ct, labels, seed)
    print(f"pool: {len(ct)} annotated slices from {n_cases} phantoms in {time.perf_counter() - started:.0f} s; {norm}")
    x_all = ((np.clip(ct, norm.clip_low, norm.clip_high) - norm.mean) / norm.std).astype(np.float32)
    arch = plain_unet_kwargs(features_per_stage=FEATURES, strides=STRIDES)
    network = build_network(network_class_name=NETWORK, arch_kwargs=arch, input_channels=1, num_classes=NUM_CLASSES)
    network = network.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, weight_decay=3e-5)
    rng = np.random.default_rng(seed + 1)
    train_start = time.perf_counter()
    for step in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (1 - step / iterations) ** 0.9
        pick = rng.integers(0, len(x_all), batch)
        x = torch.from_numpy(x_all[pick, None]).to(memory_format=torch.channels_last)
        y = torch.from_numpy(labels[pick].astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = network(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == iterations - 1:
            print(f"step {step:5d}  loss {loss.item():+.4f}  {time.perf_counter() - train_start:6.0f} s", flush=True)
    train_seconds = time.perf_counter() - train_start

    out.mkdir(parents=True, exist_ok=True)
    network = network.eval().float().to(memory_format=torch.contiguous_format)
    save_model(network, str(out / "weights.safetensors"))
    export_onnx(network, out / "model.onnx", input_channels=1, tile_size=TILE)
    card = ModelCard(
        name="trunkseg-demo-phantom",
        version="1.0.0",
        description="Demo 2D U-Net trained on synthetic phantoms only (sparse mid-level slices T4-L4). "
        "It knows no real anatomy: use it to run and test the pipeline, not to measure patients.",
        channel_labels=tuple(range(NUM_CLASSES)),
        frame="LPS",
        pixel_spacing_mm=(PIXEL_SPACING_MM, PIXEL_SPACING_MM),
        tile_size=TILE,
        normalization=norm,
        network_class_name=NETWORK,
        arch_kwargs=arch,
        files={"weights": {"path": "weights.safetensors"}, "onnx": {"path": "model.onnx"}},
        provenance={
            "trained_by": "python -m training.train_demo",
            "training_data": f"{len(ct)} sparse annotated slices (13 mid-level slices T4-L4 each) of {n_cases} phantoms, seed {seed}",
            "iterations": iterations,
            "batch_size": batch,
            "optimizer": "Adam lr 1e-3 poly 0.9, weight decay 3e-5; loss soft Dice + cross-entropy; bf16 autocast",
            "train_cpu_seconds": round(train_seconds, 1),
            "machine": f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}",
            "labels": dict(LABELS),
        },
    )
    write_model_card(card, out)
    print(f"wrote {out} ({train_seconds:.0f} s of training)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("model/packages/demo-phantom"))
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    train(args.out, iterations=args.iterations, batch=args.batch, n_cases=args.cases, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
