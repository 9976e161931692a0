"""How far is the paper-sized network from the GPU's FLOP limit, and what closes the gap? One short GPU run.

    python3 benchmarks/gpu_network_variants.py --out DIR                 # on a CUDA machine (about 3 minutes on an H200)
    .venv/bin/python benchmarks/gpu_network_variants.py --rehearse --out DIR   # the same code on the CPU, tiny network

The network alone (no slice pipeline): 304 slices of 512x512 as 38 batches of 8 seeded random tiles, channels_last,
timed with CUDA events after a warm-up, in several forms of the same weights:
- fp32: float32, TF32 off (the product's --precision fp32);
- fp32-tf32: float32 with TF32 convolutions allowed;
- fp16-islands: autocast float16 with every normalisation layer in float32 (the product's fp16, TorchCudaRunner._eager);
- fp16-islands-graph: the same replayed from a CUDA graph (TorchCudaRunner.run_device, the product's default);
- fp16-pure: the whole network in float16, normalisation included;
- bf16-islands: autocast bfloat16, normalisation in float32;
- fp16-islands-compiled: torch.compile of fp16-islands (default mode; its compile time is reported).
Each row: seconds for the 304 slices, TFLOP/s (FLOPs counted once by torch.utils.flop_counter), the multiple of the
FLOP limit (--peak-tflops, 790 for an H200's dense fp16/bf16 by measurement here), and the share of pixels whose
argmax differs from fp32's on the first batch. Writes DIR/variants.json after every row; --budget-s bounds the run.
docs/benchmarks.md ("The GPU path measured on an H200") keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPS = REPO / ".gpu-deps"  # benchmarks/gpu_session.py --stage-deps: the network code the GPU machine lacks
for path in (DEPS, REPO):
    if path.is_dir() and str(path) not in sys.path:
        sys.path.insert(0, str(path))


def count_flops(network, batch) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(batch[:1])
    return float(counter.get_total_flops())


def time_forward(forward, batches, *, device) -> tuple[float, object]:
    """Seconds for all `batches` after a warm-up of three, and the first batch's output."""
    import torch

    with torch.inference_mode():
        for batch in batches[:3]:
            forward(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            first = forward(batches[0]).float()
            for batch in batches[1:]:
                forward(batch)
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1000, first
        started = time.perf_counter()
        first = forward(batches[0]).float()
        for batch in batches[1:]:
            forward(batch)
        return time.perf_counter() - started, first


def build_variants(package, *, device) -> dict:
    """name -> a function making (forward, note): built lazily, one at a time, so each row's memory is its own."""
    import torch

    from model.network import load_package_network
    from model.runtimes.cuda import TorchCudaRunner, float32_norms

    def network(*, islands: bool = False, dtype=None):
        module = load_package_network(package)
        if islands:
            float32_norms(module)
        module = module.eval().to(device, memory_format=torch.channels_last)
        return module.to(dtype) if dtype is not None else module

    def autocast(dtype):
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)

    def fp32(tf32: bool):
        def make():
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            return network(), "TF32 on" if tf32 else "TF32 off"
        return make

    def islands(dtype):
        def make():
            module = network(islands=True)

            def forward(batch):
                with autocast(dtype):
                    return module(batch)
            return forward, f"autocast {dtype}, normalisation in float32"
        return make

    def graph():
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        runner = TorchCudaRunner(package, precision="fp16", cuda_graphs=True).__enter__()
        return runner.run_device, "TorchCudaRunner.run_device (the product's default)"

    def pure_fp16():
        module = network(dtype=torch.float16)
        return (lambda batch: module(batch.half())), "the whole network in float16"

    def compiled():
        forward, _ = islands(torch.float16)()
        started = time.perf_counter()
        fast = torch.compile(forward)
        with torch.inference_mode():
            fast(torch.zeros((8, *package_input_shape(package)), device=device).contiguous(memory_format=torch.channels_last))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return fast, f"torch.compile default mode, compiled in {time.perf_counter() - started:.1f} s"

    return {"fp32": fp32(False), "fp32-tf32": fp32(True), "fp16-islands": islands(torch.float16), "fp16-islands-graph": graph,
            "fp16-pure": pure_fp16, "bf16-islands": islands(torch.bfloat16), "fp16-islands-compiled": compiled}


def package_input_shape(package) -> tuple[int, int, int]:
    card = package.card
    return (card.input_channels, *card.tile_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true", help="the CPU, a small network of the same family, 3 batches")
    parser.add_argument("--budget-s", type=float, default=240.0, help="variants that would start after this are skipped")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense fp16/bf16 rate (H200: ~790 measured)")
    parser.add_argument("--only", nargs="*", default=None, help="these variants only")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.paper_network import paper_package
    from model.network import load_package_network
    from model.package import load_model_package

    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.rehearse else "cpu")
    if args.rehearse:
        torch.set_num_threads(1)
    elif device.type != "cuda":
        print("no CUDA device: nothing to measure (--rehearse runs the same code on the CPU)", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trunkseg-variants-"))
    extra = {"features_per_stage": (4, 8, 16), "tile_size": (64, 64)} if args.rehearse else {}
    package = load_model_package(paper_package(work / "paper", spacing_mm=0.7, **extra))
    n_batches, batch_size = (3, 2) if args.rehearse else (38, 8)
    generator = torch.Generator(device="cpu").manual_seed(2026)
    shape = package_input_shape(package)
    batches = [torch.randn((batch_size, *shape), generator=generator).to(device).contiguous(memory_format=torch.channels_last)
               for _ in range(n_batches)]
    slices = n_batches * batch_size
    flops_per_slice = count_flops(load_package_network(package).eval().to(device), batches[0])
    limit_s = slices * flops_per_slice / (args.peak_tflops * 1e12)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "slices": slices, "batch_size": batch_size, "tile_yx": list(package.card.tile_size),
              "gflop_per_slice": round(flops_per_slice / 1e9, 2), "peak_tflops": args.peak_tflops,
              "limit_s": float(f"{limit_s:.4g}"), "rows": []}
    reference = None
    for name, make in build_variants(package, device=device).items():
        if args.only is not None and name not in args.only:
            continue
        row = {"name": name}
        if time.perf_counter() - began > args.budget_s:
            row.update(status="skipped", reason=f"past the {args.budget_s:g} s budget")
        else:
            try:
                forward, note = make()
                seconds, first = time_forward(forward, batches, device=device)
                labels = first.argmax(1)
                reference = labels if name == "fp32" else reference
                row.update(status="ok", note=note, seconds=round(seconds, 4), ms_per_slice=round(1000 * seconds / slices, 3),
                           tflops=round(slices * flops_per_slice / seconds / 1e12, 1),
                           times_the_limit=round(seconds / limit_s, 1),
                           flipped_vs_fp32=None if reference is None else round(float((labels != reference).float().mean()), 5))
                del forward
            except Exception as error:  # a measurement script: a variant that fails is recorded and the next one runs
                row.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-2000:])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["rows"].append(row)
        print(json.dumps(row)[:400], flush=True)
        (args.out / "variants.json").write_text(json.dumps(result, indent=1))
    print(f"{result['gflop_per_slice']} GFLOP a slice; {slices} slices at {args.peak_tflops:g} TFLOP/s: {result['limit_s']} s")
    print("| variant | s | ms/slice | TFLOP/s | x the limit | argmax flipped vs fp32 | note |\n|---|---:|---:|---:|---:|---:|---|")
    for row in result["rows"]:
        if row["status"] == "ok":
            print(f"| {row['name']} | {row['seconds']} | {row['ms_per_slice']} | {row['tflops']} | {row['times_the_limit']} | "
                  f"{row['flipped_vs_fp32']} | {row['note']} |")
        else:
            print(f"| {row['name']} | {row['status']}: {row.get('error') or row.get('reason')} | | | | | |")
    return 1 if any(row["status"] == "failed" for row in result["rows"] if not (args.rehearse and row["name"] == "fp16-islands-graph")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
