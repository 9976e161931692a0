"""OpenVINO's own InstanceNorm (MVN) against our two-pass one: speed and numerics, paper-sized network.

    .venv/bin/python benchmarks/bench_openvino_norm.py [--work DIR] [--threads N] [--repeat N]

Our ONNX export writes each InstanceNorm out as row-then-column reductions (model/export.py,
StableInstanceNorm2d) because a single float32 reduction over a 512x512 plane moved labels in ONNX Runtime.
OpenVINO cannot fuse that pattern, and on int8 the unfused norm is a third of the network's time. This
script exports the same seeded paper-sized network (benchmarks/bench_cpu_precision.py) a second way, with
torch's InstanceNorm2d as ONNX InstanceNormalization (OpenVINO turns it into one MVN and fuses scale,
shift and LeakyReLU into it), quantizes both the same way (model/quantize.py, phantom calibration), and
prints per OpenVINO mode: ms per 512x512 tile, and on two real network inputs (phantom slices) the max
|logits - float64 torch| and the share of labels that differ from float64 torch's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def export_with_onnx_instance_norm(network, path: Path, tile_size: tuple[int, int]) -> Path:
    """`network` as ONNX with its InstanceNorm2d left to torch's exporter (InstanceNormalization), same settings as ours.

    Not model.export.export_onnx with the swap left out: its check against torch (ONNX Runtime, 1e-3) refuses
    exactly this graph, which is what this script measures.
    """
    import onnx
    import torch

    from model.export import OPSET, inline_shared_initializers
    from model.package import INPUT_NAME, OUTPUT_NAME

    with torch.no_grad():
        torch.onnx.export(network.eval(), (torch.zeros(1, 1, *tile_size),), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET, do_constant_folding=True,
                          dynamo=False)
    model = onnx.load(str(path))
    inline_shared_initializers(model.graph)
    assert sum(node.op_type == "InstanceNormalization" for node in model.graph.node) > 0, "the export kept no InstanceNormalization"
    onnx.save(model, str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="working folder (an earlier run's files are reused)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import openvino
    import torch

    from benchmarks.paper_network import paper_package
    from model.network import load_package_network
    from model.package import load_model_package
    from model.precision import phantom_volumes
    from model.quantize import CALIBRATION_SEEDS, calibration_tiles, quantize_onnx
    from model.runtimes.cpu import OpenVinoRunner
    from model.runtimes.precision import onnx_role

    work = args.work or Path(tempfile.mkdtemp(prefix="trunkseg-bench-norm-"))
    folder = work / "paper-package"
    if not (folder / "model.json").is_file():
        paper_package(folder, spacing_mm=0.7)
    package = load_model_package(folder)
    card = package.card
    files = {"ours (two-pass reductions)": folder / "model.onnx", "OpenVINO MVN (InstanceNormalization)": work / "model.mvn.onnx"}
    if not files["OpenVINO MVN (InstanceNormalization)"].is_file():
        export_with_onnx_instance_norm(load_package_network(package), files["OpenVINO MVN (InstanceNormalization)"], card.tile_size)
    calibration = calibration_tiles(card, phantom_volumes(card, seeds=CALIBRATION_SEEDS[:3]))
    int8 = {}
    for name, path in files.items():
        int8[name] = path.with_suffix(".int8.onnx")
        if not int8[name].is_file():
            quantize_onnx(path, int8[name], calibration)

    inputs = calibration_tiles(card, phantom_volumes(card, seeds=(777,)), max_tiles=2)
    with torch.no_grad():
        reference = load_package_network(package).double().eval()(torch.from_numpy(inputs).double()).numpy()
    labels = reference.argmax(1)
    core = openvino.Core()
    print(f"{os.cpu_count()} CPUs, {args.threads} threads, OpenVINO {openvino.__version__}; work {work}\n")
    print("| graph | mode | ms per tile | max abs logits - float64 torch | labels differing from float64 torch |\n|---|---|---:|---:|---:|")
    for name in files:
        for mode in OpenVinoRunner.precisions:  # each graph under the settings the runner compiles it with
            path = int8[name] if onnx_role(mode) == "onnx_int8" else files[name]
            config = OpenVinoRunner(package, threads=args.threads, precision=mode).compile_config()
            compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            request = compiled.create_infer_request()
            logits = np.concatenate([request.infer([inputs[i : i + 1]])[0].copy() for i in range(len(inputs))])
            started = time.perf_counter()
            for _ in range(args.repeat):
                request.infer([inputs[:1]])
            ms = 1000 * (time.perf_counter() - started) / args.repeat
            print(f"| {name} | {mode} | {ms:.0f} | {float(np.abs(logits - reference).max()):.2g} | {100 * float((logits.argmax(1) != labels).mean()):.3f} % |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
