"""CPU precision modes end to end: nnUNetPredictor and ours in fp32, bf16, int8 and int8+bf16, same CT, same weights, one run.

    .venv/bin/python benchmarks/bench_cpu_precision.py                    # paper-sized network, 512x512x300 CT
    .venv/bin/python benchmarks/bench_cpu_precision.py --slices 60 --no-nnunet --models demo
    .venv/bin/python benchmarks/bench_cpu_precision.py --help

Models (`--models`, default both):
- `paper`: the published scale, nnU-Net's default 2d plan for 512x512 CT: PlainConvUNet, 8 stages,
  features 32-512, 46 M parameters, one 512x512 tile per slice at 0.7 mm (the CT's own spacing, so no
  resampling), seeded random weights (speed: a random network's near-ties make its agreement a
  stress test, not a property of a trained model).
- `demo`: the bundled trained demo package (256x256 tiles at 1.5 mm; the CT is resampled), for the
  agreement of each mode on trained weights.
Each model also gets its int8 export (model/quantize.py, calibrated on phantom slices).

Runs, each in its own child process (so each peak RSS is its own; os.wait4), on the same CT file:
nnUNetPredictor (when nnunetv2 is installed; predict_from_files_sequential, no mirroring, step 0.5,
as benchmarks/bench_nnunet.py), then process.py with --runtime/--precision for each of `--runs`.
Prints one markdown table per model: process wall s, case s (read to written), network s (inside
the runtime's calls), ms/slice, peak RSS, and voxel agreement / min per-label Dice against our ONNX
Runtime fp32 labels, plus the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.paper_network import paper_package  # noqa: E402  (the `paper` model; bench_openvino_norm.py and gpu_session.py build it too)

#: runtime-precision runs of process.py; the first is the reference of the agreement columns
DEFAULT_RUNS = ("onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int8+bf16", "onnxruntime-int8")


def run_child(args: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stderr of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed ({code}):\n{stderr[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, stderr


def labels_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def checkout(ref: str, work: Path) -> Path:
    """The repository's tree at `ref` (git archive, no worktree bookkeeping), for baseline runs of its process.py."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True, text=True).stdout.strip()
    tree = work / f"tree-{commit}"
    if not (tree / "process.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def precisions_of(tree: Path) -> tuple[str, ...]:
    """The precision modes a tree's process.py accepts (a baseline may predate some of ours)."""
    code = (f"import sys; sys.path.insert(0, {str(tree)!r})\ntry:\n    from model.runtimes.precision import PRECISIONS\n"
            f"except ImportError:  # before model/runtimes/\n    from model.precision import PRECISIONS\nprint(' '.join(PRECISIONS))")
    return tuple(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def bench_model(label: str, package: Path, ct: Path, work: Path, args, env: dict) -> None:
    from model.package import load_model_package
    from model.precision import agreement_of

    card = load_model_package(package).card
    n_slices = sitk.ReadImage(str(ct)).GetSize()[2] * len(list(ct.parent.glob("*.nii.gz")))  # over every case of the folder (--cases)
    rows, masks = [], {}
    print(f"\n## {label}: {card.description}; tile {card.tile_size[0]}x{card.tile_size[1]} at {card.pixel_spacing_mm[0]} mm, "
          f"{n_slices} slices; load average before: {load_average()}", flush=True)
    if args.nnunet:
        from benchmarks.bench_nnunet import results_from_package

        results = results_from_package(package, work / f"nnunet-{label}")
        out = work / f"nnunet-{label}" / "pred" / ct.name
        out.parent.mkdir(parents=True, exist_ok=True)
        child = [sys.executable, "-c",
                 "import sys, json; sys.path.insert(0, %r); from benchmarks.bench_nnunet import predict_child; from pathlib import Path; "
                 "predict_child(Path(sys.argv[1]), ['0'], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))" % str(REPO),
                 str(results), str(ct), str(out), str(args.threads)]
        wall, rss, err = run_child(child, env)
        case_s = json.loads([line for line in err.splitlines() if line.startswith('{"predict_s"')][-1])["predict_s"]
        masks["nnUNetPredictor"] = np.asarray(card.channel_labels, dtype=np.uint8)[labels_of(out)]
        rows.append(("nnUNetPredictor (torch fp32, baseline)", wall, case_s, None, rss))
        print(f"  nnUNetPredictor: {case_s:.1f} s", file=sys.stderr, flush=True)
    trees = [(f"baseline {args.baseline_ref}", checkout(args.baseline_ref, work))] if args.baseline_ref else []
    trees.append(("ours", REPO))
    for key in args.runs:
        runtime, precision = key.rsplit("-", 1)
        for who, tree in trees:  # the baseline's run right before ours: the same machine state for both
            if who != "ours" and precision not in precisions_of(tree):
                print(f"  {who}: has no precision {precision!r}: {key} runs for ours only", file=sys.stderr, flush=True)
                continue
            name = key if who == "ours" else f"{key} ({who})"
            out = work / f"{who.replace(' ', '-')}-{label}-{key}"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss, err = run_child([sys.executable, str(tree / "process.py"), "--input", str(ct.parent), "--output", str(out),
                                        "--model", str(package), "--runtime", runtime, "--precision", precision,
                                        "--threads", str(args.threads), "--batch-size", str(args.batch_size)], dict(env, PYTHONPATH=str(tree)))
            cases = json.loads((out / "results.json").read_text())["cases"]
            case = cases[0]
            t = {k: sum(c["timings_s"][k] for c in cases) for k in case["timings_s"]}  # all cases (--cases)
            case_s = sum(v for k, v in t.items() if "." not in k)
            masks[name] = labels_of(out / case["output"])
            rows.append((f"{who}, {key}", wall, case_s, t["segment.network"], rss))
            around = {k.split(".")[-1]: round(v, 1) for k, v in t.items() if k != "segment.network" and k != "segment"}
            print(f"  {who}, {key}: {case_s:.1f} s (network {t['segment.network']:.1f} s; {around})", file=sys.stderr, flush=True)

    reference = masks[args.runs[0]]  # ours
    print(f"\n| run | process wall s | case s | network s | ms/slice (case) | network ms/slice | peak RSS MiB | "
          f"voxels = {args.runs[0]} | min Dice vs {args.runs[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, wall, case_s, network_s, rss), mask in zip(rows, masks.values()):
        agreement = agreement_of([reference], [mask])
        print(f"| {name} | {wall:.1f} | {case_s:.1f} | {'' if network_s is None else f'{network_s:.1f}'} | {1000 * case_s / n_slices:.0f} | "
              f"{'' if network_s is None else f'{1000 * network_s / n_slices:.0f}'} | {rss:.0f} | "
              f"{100 * agreement['voxel_agreement']:.4f} % | {agreement['min_dice']:.4f} ({agreement['labels_compared']} labels) |")
    print(f"\nload average after: {load_average()}", flush=True)


def resample_argmax_gathering_blocks(logits_ncyx: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """The baseline of preprocess.resample.resample_argmax (until 2026-12-02): (k, channels) corner blocks by mixed advanced indexing."""
    from preprocess.resample import linear_taps, argmax_channels

    coarse = argmax_channels(logits_ncyx)
    ylo, yhi, wy = linear_taps(logits_ncyx.shape[-2], shape_yx[0])
    xlo, xhi, wx = linear_taps(logits_ncyx.shape[-1], shape_yx[1])
    corners = [coarse[:, ys][:, :, xs] for ys in (ylo, yhi) for xs in (xlo, xhi)]
    out = corners[0].copy()
    mixed = (corners[0] != corners[1]) | (corners[0] != corners[2]) | (corners[0] != corners[3])
    n, i, j = np.nonzero(mixed)
    if n.size:
        fy, fx = wy[i][:, None], wx[j][:, None]
        top = logits_ncyx[n, :, ylo[i], xlo[j]] * (1 - fx) + logits_ncyx[n, :, ylo[i], xhi[j]] * fx
        bottom = logits_ncyx[n, :, yhi[i], xlo[j]] * (1 - fx) + logits_ncyx[n, :, yhi[i], xhi[j]] * fx
        out[n, i, j] = np.argmax(top * (1 - fy) + bottom * fy, axis=1)
    return out


def bench_stages(args) -> None:
    """The work around the network, per slice: each fast path against the call it replaces, same data, same run."""
    from dataclasses import replace

    from scipy import ndimage

    from model.package import load_model_package
    from model.segment import SegmentStats, segment_volume
    from preprocess.resample import argmax_channels, resample_argmax, resample_slices
    from model.phantom import make_phantom

    rng = np.random.default_rng(0)
    stack = ndimage.gaussian_filter(rng.normal(0, 1, (8, 512, 512)), (0, 2, 2)).astype(np.float32)
    logits = ndimage.zoom(rng.normal(size=(4, 23, 16, 16)).astype(np.float32), (1, 1, 32, 32), order=1)

    def per_slice(call, n: int, repeat: int = 3) -> float:
        call()
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        return 1000 * (time.perf_counter() - started) / repeat / n

    print(f"\n## work around the network (ms per 512x512 slice); load average before: {load_average()}\n")
    print("| step | before | now |\n|---|---:|---:|")
    zoom = per_slice(lambda: ndimage.zoom(stack, (1, 499 / 512, 499 / 512), order=3, mode="nearest", grid_mode=True), len(stack))
    print(f"| cubic resampling 512 -> 499 (0.78 -> 0.8 mm): ndimage.zoom / two matrix products | {zoom:.1f} | "
          f"{per_slice(lambda: resample_slices(stack, (499, 499), order=3), len(stack)):.1f} |")
    boundary = resample_argmax_gathering_blocks(logits, (499, 499))
    if not np.array_equal(boundary, resample_argmax(logits, (499, 499))):
        raise SystemExit("resample_argmax differs from its baseline")
    print(f"| argmax of the logits resampled 512 -> 499, boundary pixels: (k, 23) corner blocks / plane by plane flat gathers | "
          f"{per_slice(lambda: resample_argmax_gathering_blocks(logits, (499, 499)), len(logits)):.1f} | "
          f"{per_slice(lambda: resample_argmax(logits, (499, 499)), len(logits)):.1f} |")
    print(f"| argmax over 23 channels: np.argmax(axis=1) / plane by plane | {per_slice(lambda: np.argmax(logits, axis=1), len(logits)):.1f} | "
          f"{per_slice(lambda: argmax_channels(logits), len(logits)):.1f} |")
    card = replace(load_model_package(REPO / "model" / "packages" / "demo-phantom").card, tile_size=(512, 512), pixel_spacing_mm=(0.8, 0.8))
    network = lambda batch: logits[: len(batch)].copy()  # noqa: E731  (a network that costs nothing: the rest is what is left)
    for spacing in (0.8, 0.78, 0.7):
        phantom = make_phantom(1, size_xy=(512, 512), spacing_mm=(spacing, spacing, 3.0), n_slices=24)
        stats = SegmentStats()
        started = time.perf_counter()
        segment_volume(phantom.ct_zyx, pixel_spacing_mm=(spacing, spacing), card=card, network=network, batch_size=1, stats=stats, slice_spacing_mm=3.0)
        total = 1000 * (time.perf_counter() - started) / 24
        parts = ", ".join(f"{k} {1000 * v / 24:.1f}" for k, v in stats.seconds.items() if k != "network")
        print(f"| segment_volume without the network, CT {spacing} mm, model 0.8 mm, 512x512 tile ({parts}) | | {total - 1000 * stats.seconds['network'] / 24:.1f} |")
    print(f"\nload average after: {load_average()}", flush=True)


def bench_network(args, package: Path, keys: list[str], repeat: int = 5) -> None:
    """Network only, in this process: ms per tile of each runner on the same seeded tiles (batch --batch-size)."""
    from model.package import load_model_package
    from model.precision import open_runner

    loaded = load_model_package(package)
    tiles = np.random.default_rng(0).normal(size=(args.batch_size, 1, *loaded.card.tile_size)).astype(np.float32)
    print(f"\n## network only, {loaded.card.tile_size[0]}x{loaded.card.tile_size[1]} tiles, batch {args.batch_size}; "
          f"load average before: {load_average()}\n\n| runner | ms per tile |\n|---|---:|")
    for key in keys:
        with open_runner(key, loaded, threads=args.threads) as runner:
            runner(tiles)
            started = time.perf_counter()
            for _ in range(repeat):
                runner(tiles)
            print(f"| {key} | {1000 * (time.perf_counter() - started) / repeat / len(tiles):.0f} |", flush=True)
    print(f"\nload average after: {load_average()}", flush=True)
    if args.layers:
        for key in keys:
            if key.startswith("openvino-"):
                print_openvino_layer_times(key, loaded, tiles, threads=args.threads)


def print_openvino_layer_times(key: str, package, tiles: np.ndarray, *, threads: int, repeat: int = 3) -> None:
    """Where an OpenVINO runner's time goes: its compiled layers' times (PERF_COUNT), summed by layer and kernel type."""
    import openvino

    from model.precision import open_runner
    from model.runtimes.precision import onnx_role

    runner = open_runner(key, package, threads=threads)  # for its settings only: compiled here again with PERF_COUNT
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(package.path_of(onnx_role(runner.precision)))), "CPU",
                                  {**runner.compile_config(), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer([tiles])
    totals: dict[tuple[str, str], float] = {}
    for _ in range(repeat):
        request.infer([tiles])
        for layer in request.profiling_info:
            kind = (layer.node_type, layer.exec_type)
            totals[kind] = totals.get(kind, 0.0) + layer.real_time.total_seconds() * 1000 / repeat / len(tiles)
    total = sum(totals.values())
    print(f"\n### {key}: layer times, ms per tile (sum {total:.0f})\n\n| layer type | kernel | ms | share |\n|---|---|---:|---:|")
    for (node_type, exec_type), ms in sorted(totals.items(), key=lambda item: -item[1]):
        if ms >= 0.5:
            print(f"| {node_type} | {exec_type} | {ms:.1f} | {100 * ms / total:.0f} % |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--models", nargs="+", choices=("paper", "demo"), default=["paper", "demo"])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help=f"runtime-precision runs of process.py (default {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--no-nnunet", dest="nnunet", action="store_false", help="leave out nnUNetPredictor")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=1, help="process.py --batch-size (tiles per network call; 1 is fastest here)")
    parser.add_argument("--calibration-ct", type=Path, nargs="*", default=[], help="real CT files for the int8 calibration")
    parser.add_argument("--baseline-ref", default=None, metavar="REF",
                        help="also run each of --runs with process.py as it was at this git commit, right before ours (same CT, same package)")
    parser.add_argument("--ct-spacing-mm", type=float, default=None,
                        help="in-plane spacing of the phantom CT (default: the model's, so no resampling; e.g. 0.78 makes the pipeline resample)")
    parser.add_argument("--cases", type=int, default=1, help="run the CT as this many cases in one process.py run (times summed over them)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one; an earlier one's packages are reused)")
    parser.add_argument("--stages", action="store_true", help="only the work around the network (resampling, argmax, blending)")
    parser.add_argument("--network-only", nargs="*", default=None, metavar="RUNNER",
                        help="only the network, ms per tile, for these runners (default: every CPU runner, torch included)")
    parser.add_argument("--layers", action="store_true", help="with --network-only: where each OpenVINO runner's time goes, by layer type")
    args = parser.parse_args()
    if args.stages:
        bench_stages(args)
        return 0
    if args.nnunet:
        import importlib.util

        if importlib.util.find_spec("nnunetv2") is None:
            print("nnunetv2 is not installed: nnUNetPredictor left out", file=sys.stderr)
            args.nnunet = False

    from model.package import load_model_package
    from model.quantize import quantize_package
    from model.phantom import make_phantom

    work = args.work or Path(tempfile.mkdtemp(prefix="trunkseg-bench-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), nnUNet_def_n_proc=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, batch {args.batch_size}; "
          f"work {work}", flush=True)
    for label in args.models:
        started = time.perf_counter()
        spacing = 0.7 if label == "paper" else 0.8
        package = work / f"{label}-package"
        if (package / "model.json").is_file():  # made by an earlier run with this --work: reused
            print(f"{label}: reusing {package}", file=sys.stderr)
        elif label == "paper":
            paper_package(package, spacing_mm=spacing)
        else:
            shutil.copytree(REPO / "model" / "packages" / "demo-phantom", package)
        wanted = args.runs if args.network_only is None else (args.network_only or ["-int8"])  # no runner named: all of them, int8 too
        if any("-int8" in run for run in wanted) and "onnx_int8" not in load_model_package(package).card.files:
            quantize_package(package, ct=args.calibration_ct)
        if args.network_only is not None:
            keys = args.network_only or ["onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int8+bf16", "onnxruntime-int8",
                                         "torch-cpu-fp32", "torch-cpu-bf16"]
            bench_network(args, package, keys)
            continue
        ct_spacing = args.ct_spacing_mm or spacing
        ct = work / f"in-{label}-{ct_spacing:g}mm-{args.slices}" / "bench.nii.gz"
        if not ct.is_file():  # an earlier run with this --work made it: reused
            phantom = make_phantom(2026, size_xy=(512, 512), spacing_mm=(ct_spacing, ct_spacing, 1.0), n_slices=args.slices)
            ct.parent.mkdir(exist_ok=True)
            sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(phantom.ct_zyx)), str(work / "partial.nii.gz"), useCompression=True)
            os.replace(work / "partial.nii.gz", ct)  # the input folder never holds a half-written CT
        if args.cases > 1:  # the same CT as several cases (hard links): what reading ahead hides shows in the later cases' read times
            folder = ct.parent.with_name(f"{ct.parent.name}-x{args.cases}")
            folder.mkdir(exist_ok=True)
            for k in range(args.cases):
                if not (folder / f"case{k}.nii.gz").exists():
                    os.link(ct, folder / f"case{k}.nii.gz")
            ct = folder / "case0.nii.gz"
        print(f"{label}: package, int8 export and CT ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        bench_model(label, package, ct, work, args, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
