"""A fresh process from its start to a 512x512x300 CT's labels on the GPU, through process.py's own calls, file I/O aside.

    python3 benchmarks/gpu_cold_start.py --out DIR                    # on a CUDA machine (about 1-2 minutes on an H200)
    .venv/bin/python benchmarks/gpu_cold_start.py --rehearse --out DIR  # the same code on the CPU, a tiny CT

The machine lent for GPU work has no SimpleITK, so process.py itself cannot run there (docs/benchmarks.md). This
measures everything process.py does for one case except reading the CT file, reorienting it and writing the mask:
the parent makes the CT once (model/phantom.py) and saves it as .npy; then, per model, a child process that the
parent timestamps at its spawn
1. starts the interpreter and imports numpy, torch and the product's modules (`import_s`);
2. loads and verifies the model package (`package_s`: every file's SHA-256 against its card);
3. starts the runtime as process.py does (`runtime_s`: model.runtimes.choice.start_chosen_runtime("auto", "auto"):
   CUDA start-up, the network on the GPU), and takes its segmenter (segmenter_for, the runner's preferred batch);
4. loads the CT array from .npy (`load_s`, a stand-in for the reader: a raw array, not a compressed .mha);
5. segments it (`first_segment_s`: cuDNN autotuning and graph capture included), then once more (`second_segment_s`).
`to_labels_s` is the spawn to the first labels. Rows (ROWS): each model as the product runs it, and with one thing
changed after the runtime started, to see where a cold first CT's time goes: `no-padding` runs the last, short batch
at its own size (as before model/runtimes/cuda.padded_batch_size), `benchmark-off` turns cuDNN's autotuning off.
Writes DIR/cold_start.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPS = REPO / ".gpu-deps"  # benchmarks/gpu_session.py --stage-deps: the network code the GPU machine lacks
for path in (DEPS, REPO):  # this script and its children (the same file) import the product from here
    if path.is_dir() and str(path) not in sys.path:
        sys.path.insert(0, str(path))


#: (model, what its child changes after the runtime started, for measurement only): "product" as it is, "no-padding"
#: runs the short last batch at its own size (as before padded_batch_size), "benchmark-off" turns cuDNN's autotuning off
ROWS = (("demo", "product"), ("demo", "no-padding"), ("paper", "product"), ("paper", "no-padding"), ("paper", "benchmark-off"))


def run_child(package_dir: str, ct_path: str, spawned_at: float, rehearse: bool, variant: str) -> dict:
    entered = time.time()
    import numpy as np
    import torch

    from model.package import load_model_package
    from model.runtimes.choice import segmenter_for, start_chosen_runtime
    from model.segment import SegmentStats

    marks = {"interpreter_s": entered - spawned_at, "import_s": time.time() - entered}
    started = time.time()
    package = load_model_package(Path(package_dir))
    marks["package_s"] = time.time() - started
    started = time.time()
    runtime_name = "onnxruntime" if rehearse else "auto"  # the rehearsal's CPU: a runtime that needs no GPU
    with start_chosen_runtime(runtime_name, "auto", package, threads=1 if rehearse else len(__import__("os").sched_getaffinity(0)),
                              log=lambda message: None) as started_runtime:
        segment, network, batch_size = segmenter_for(started_runtime.runtime, None)
        runner = started_runtime.runtime
        applied = hasattr(runner, "pad_batches")  # the torch-cuda runner (not the rehearsal's ONNX Runtime)
        if applied and variant == "no-padding":
            runner.pad_batches = False
        if applied and variant == "benchmark-off":
            torch.backends.cudnn.benchmark = False
        marks["runtime_s"] = time.time() - started
        started = time.time()
        ct = np.load(ct_path)
        volume, pixel_spacing_mm, slice_spacing_mm = ct["volume_zyx"], tuple(ct["spacing_mm"][:2]), float(ct["spacing_mm"][2])
        marks["load_s"] = time.time() - started
        for name in ("first_segment_s", "second_segment_s"):
            started = time.time()
            labels = segment(volume, pixel_spacing_mm=pixel_spacing_mm, card=package.card, network=network, batch_size=batch_size,
                             stats=SegmentStats(), slice_spacing_mm=slice_spacing_mm)
            marks[name] = time.time() - started
            if name == "first_segment_s":
                marks["to_labels_s"] = time.time() - spawned_at
        description = started_runtime.describe()
    return {**{k: round(v, 3) for k, v in marks.items()}, "runtime": description["name"], "precision": description["precision"],
            "batch_size": batch_size, "variant_applied": applied, "labels_shape": list(labels.shape), "labelled_share": round(float(np.mean(labels > 0)), 4),
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rehearse", action="store_true", help="the CPU (ONNX Runtime), a 64x64x4 CT and a small network")
    parser.add_argument("--child", nargs=4, metavar=("PACKAGE", "CT", "SPAWNED_AT", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child[0], args.child[1], float(args.child[2]), args.rehearse, args.child[3])))
        return 0
    if args.out is None:
        parser.error("--out is required")
    import numpy as np

    from benchmarks.paper_network import paper_package
    from model.phantom import make_phantom

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trunkseg-cold-start-"))
    size, slices = ((64, 64), 4) if args.rehearse else ((512, 512), 300)
    phantom = make_phantom(2026, size_xy=size, spacing_mm=(0.7, 0.7, 1.2), n_slices=slices)
    ct_path = work / "ct.npz"
    np.savez(ct_path, volume_zyx=phantom.ct_zyx, spacing_mm=np.array(phantom.geometry.spacing_mm))  # (x, y, z); in-plane isotropic here
    extra = {"features_per_stage": (4, 8, 16), "tile_size": (64, 64)} if args.rehearse else {}
    packages = {"demo": REPO / "model" / "packages" / "demo-phantom",
                "paper": paper_package(work / "paper", spacing_mm=0.7, **extra)}
    result = {"ct_shape_zyx": list(phantom.ct_zyx.shape), "rows": []}
    for name, variant in ROWS:
        spawned_at = time.time()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(packages[name]), str(ct_path), repr(spawned_at),
                               variant, *(["--rehearse"] if args.rehearse else [])], capture_output=True, text=True, timeout=400)
        row = {"model": name, "variant": variant, "process_s": round(time.time() - spawned_at, 3)}
        if done.returncode != 0:
            row.update(status="failed", error=done.stderr[-2000:])
        else:
            row.update(status="ok", **json.loads(done.stdout.strip().splitlines()[-1]))
        result["rows"].append(row)
        print(json.dumps(row)[:600], flush=True)
        (args.out / "cold_start.json").write_text(json.dumps(result, indent=1))
    columns = ("interpreter_s", "import_s", "package_s", "runtime_s", "load_s", "first_segment_s", "to_labels_s", "second_segment_s")
    print("| model | variant | runtime | batch | " + " | ".join(columns) + " |\n|---|---|---|---:|" + "---:|" * len(columns))
    for row in result["rows"]:
        if row["status"] == "ok":
            print(f"| {row['model']} | {row['variant']} | {row['runtime']} {row['precision']} | {row['batch_size']} | "
                  + " | ".join(str(row[c]) for c in columns) + " |")
        else:
            print(f"| {row['model']} | {row['variant']} | failed | | {row['error'][-300:]!r} |")
    return 1 if any(row["status"] != "ok" for row in result["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
