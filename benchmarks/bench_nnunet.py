"""Our CPU pipeline against nnUNetPredictor on the same nnU-Net model and the same CT, in one run.

    .venv/bin/python benchmarks/bench_nnunet.py [--model demo|default-plan] [--slices 24] [--threads 2] [--batch-size 4]
    .venv/bin/python benchmarks/bench_nnunet.py --results RESULTS_FOLDER --fold 0 1 2 3 4

The model, written as an nnU-Net results folder (plans.json, dataset.json, fold_0/checkpoint_final.pth)
and imported with model.import_nnunet:
- `--model demo` (default): the bundled trained demo package (nnU-Net's PlainConvUNet, 256x256 tiles
  at 1.5 mm) as an nnU-Net model: trained weights, so the agreement is that of a real model.
- `--model default-plan`: nnU-Net's own default 2d plan for 512x512 CT at 0.8 mm (nnU-Net plans it
  here from a few synthetic slices: PlainConvUNet, 8 stages, 32-512 features, 512x512 tiles), the
  published model's scale, with seeded random weights (speed; its agreement is a stress test, as a
  random network has near-ties everywhere and nnUNetPredictor accumulates logits in float16).
- `--results FOLDER --fold ...`: any trained nnU-Net v2 2d results folder.

The CT: a 512x512 phantom at 0.78 mm in-plane (resampled to the plan's spacing by both), stored LPS.
Both run file to file in their own process, with the same number of threads: nnUNetPredictor
(predict_from_files_sequential: SimpleITKIO read, preprocessing, sliding window with Gaussian, tile
step 0.5, no mirroring, export) and our process.py (ONNX Runtime). Prints the markdown table for
docs/benchmarks.md: wall time, peak RSS, the speed ratio, voxel agreement and per-label Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_child(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stderr of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed ({code}):\n{stderr[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, stderr


def nnunet_default_plan(work: Path, *, size: int, spacing: float) -> dict:
    """nnU-Net's experiment planner on a few synthetic 2D slices of `size`^2 at `spacing` mm: its default 2d plan."""
    from tests.nnunet_helpers import nnunet_env

    raw = work / "nnUNet_raw" / "Dataset900_BenchPlan"
    for folder in ("imagesTr", "labelsTr"):
        (raw / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        image = sitk.GetImageFromArray(rng.normal(0, 100, (1, size, size)).astype(np.int16))
        image.SetSpacing((spacing, spacing, 999.0))
        label = sitk.GetImageFromArray((rng.random((1, size, size)) > 0.5).astype(np.uint8))
        label.CopyInformation(image)
        sitk.WriteImage(image, str(raw / "imagesTr" / f"c{i}_0000.nii.gz"))
        sitk.WriteImage(label, str(raw / "labelsTr" / f"c{i}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "muscle": 1},
                                                  "numTraining": 3, "file_ending": ".nii.gz"}))
    code = (
        "from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments\n"
        "if __name__ == '__main__':\n"
        "    extract_fingerprints([900], num_processes=1, check_dataset_integrity=False, clean=True, verbose=False)\n"
        "    plan_experiments([900])\n"
    )
    env = nnunet_env(work)
    env["nnUNet_n_proc_DA"] = "1"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return json.loads((work / "nnUNet_preprocessed" / "Dataset900_BenchPlan" / "nnUNetPlans.json").read_text())


def random_results_folder(work: Path, *, size: int, spacing: float, seed: int = 0) -> Path:
    """An nnU-Net results folder: nnU-Net's default 2d plan, the 22 canonical muscles, seeded random weights."""
    import torch

    from model.import_nnunet import architecture_of
    from common.labels import LABELS
    from model.network import build_network
    from tests.nnunet_helpers import save_nnunet_checkpoint

    plans = nnunet_default_plan(work, size=size, spacing=spacing)
    plans["foreground_intensity_properties_per_channel"] = {"0": {
        "max": 1500.0, "mean": 30.0, "median": 40.0, "min": -1000.0, "percentile_00_5": -180.0, "percentile_99_5": 250.0, "std": 70.0}}
    plans["dataset_name"] = "Dataset901_BenchRandom"
    folder = work / "nnUNet_results" / "Dataset901_BenchRandom" / "nnUNetTrainer_2000epochs_NoMirroring__nnUNetPlans__2d"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    labels = {"background": 0, **LABELS}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
                                                     "file_ending": ".nii.gz", "trunkseg_frame": "LPS"}))
    name, kwargs = architecture_of(plans["configurations"]["2d"], "2d")
    torch.manual_seed(seed)
    network = build_network(network_class_name=name, arch_kwargs=kwargs, input_channels=1, num_classes=len(labels))
    with torch.no_grad():  # nnU-Net's He init leaves all InstanceNorms at identity: perturb so classes differ
        for parameter in network.parameters():
            parameter += 0.1 * torch.randn_like(parameter)
    save_nnunet_checkpoint(network, folder / "fold_0" / "checkpoint_final.pth", trainer="nnUNetTrainer_2000epochs_NoMirroring")
    return folder


def results_from_package(package_dir: Path, work: Path) -> Path:
    """Our trained package written out as an nnU-Net v2 results folder (plans, dataset.json, nnU-Net checkpoint).

    Its network is nnU-Net's PlainConvUNet with nnU-Net's arguments, so nnUNetPredictor runs it as any
    nnU-Net model: a trained model of realistic size for the agreement, without training one here.
    """
    from safetensors.torch import load_model

    from common.labels import NAMES
    from model.network import build_network
    from model.package import load_model_package
    from tests.nnunet_helpers import NNUNET_2D_PREPROCESSING, save_nnunet_checkpoint

    card = load_model_package(package_dir).card
    norm = card.normalization
    plans = {
        "dataset_name": "Dataset902_BenchDemo", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "original_median_spacing_after_transp": [3.0, card.pixel_spacing_mm[1], card.pixel_spacing_mm[0]],
        "original_median_shape_after_transp": [1, *card.tile_size], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": norm.clip_high, "min": norm.clip_low, "mean": norm.mean, "median": norm.mean, "std": norm.std,
            "percentile_00_5": norm.clip_low, "percentile_99_5": norm.clip_high}},
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
            "patch_size": list(card.tile_size), "median_image_size_in_voxels": list(card.tile_size),
            "spacing": [card.pixel_spacing_mm[1], card.pixel_spacing_mm[0]],
            **NNUNET_2D_PREPROCESSING,
            "architecture": {"network_class_name": card.network_class_name, "arch_kwargs": card.arch_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": True,
        }},
    }
    folder = work / "nnUNet_results" / "Dataset902_BenchDemo" / "nnUNetTrainer_2000epochs_NoMirroring__nnUNetPlans__2d"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    labels = {"background": 0, **{NAMES[v]: c for c, v in enumerate(card.channel_labels) if c}}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
                                                     "file_ending": ".nii.gz", "trunkseg_frame": card.frame}))
    network = build_network(network_class_name=card.network_class_name, arch_kwargs=card.arch_kwargs,
                            input_channels=1, num_classes=card.num_classes)
    load_model(network, str(package_dir / card.files["weights"].path))
    save_nnunet_checkpoint(network, folder / "fold_0" / "checkpoint_final.pth", trainer="nnUNetTrainer_2000epochs_NoMirroring")
    return folder


def predict_child(results: Path, folds: list[str], ct: Path, out: Path, threads: int) -> None:
    """(child) nnUNetPredictor, file to file, sequential (no worker processes)."""
    import torch

    from tests.nnunet_helpers import nnunet_predictor

    torch.set_num_threads(threads)
    predictor = nnunet_predictor(results, [int(f) if f != "all" else f for f in folds])
    started = time.perf_counter()
    predictor.predict_from_files_sequential([[str(ct)]], [str(out)], save_probabilities=False, overwrite=True)
    print(json.dumps({"predict_s": time.perf_counter() - started}), file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--spacing", type=float, default=0.78, help="in-plane spacing of the CT (mm)")
    parser.add_argument("--plan-spacing", type=float, default=0.8, help="in-plane spacing of nnU-Net's plan (mm)")
    parser.add_argument("--slice-spacing", type=float, default=3.0)
    parser.add_argument("--model", choices=("demo", "default-plan"), default="demo",
                        help="demo: the bundled trained demo package as an nnU-Net results folder (default); "
                             "default-plan: nnU-Net's default 2d plan for the CT's size, random weights")
    parser.add_argument("--package", type=Path, default=REPO / "model" / "packages" / "demo-phantom", help="package for --model demo")
    parser.add_argument("--results", type=Path, default=None, help="a trained nnU-Net results folder instead")
    parser.add_argument("--fold", nargs="+", default=["0"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=1, help="process.py --batch-size (tiles per network call; 1 is fastest on the CPU here)")
    parser.add_argument("--runtime", default="onnxruntime", help="process.py --runtime for ours (default onnxruntime)")
    parser.add_argument("--precision", default="fp32", help="process.py --precision for ours (default fp32; see bench_cpu_precision.py for the others)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    args = parser.parse_args()

    from model.import_nnunet import import_nnunet
    from model.package import load_model_package
    from model.phantom import make_phantom

    work = args.work or Path(tempfile.mkdtemp(prefix="trunkseg-bench-nnunet-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.results:
        results = args.results
    elif args.model == "demo":
        results = results_from_package(args.package, work)
    else:
        results = random_results_folder(work, size=args.size, spacing=args.plan_spacing)
    package = import_nnunet(results, folds=args.fold, out=work / "package", overwrite=True, log=lambda m: None)
    card = load_model_package(package).card
    print(f"model: {card.description}; tile {card.tile_size}, {card.pixel_spacing_mm} mm; arch features "
          f"{card.arch_kwargs.get('features_per_stage', card.arch_kwargs.get('arch_kwargs', {}).get('features_per_stage'))} "
          f"(set up in {time.perf_counter() - started:.0f} s)", file=sys.stderr)

    phantom = make_phantom(2025, size_xy=(args.size, args.size), spacing_mm=(args.spacing, args.spacing, args.slice_spacing), n_slices=args.slices)
    (work / "in").mkdir(exist_ok=True)
    ct = work / "in" / "bench.nii.gz"
    sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(phantom.ct_zyx)), str(ct), useCompression=True)
    shape = phantom.ct_zyx.shape
    env = dict(os.environ, PYTHONPATH=str(REPO), nnUNet_def_n_proc=str(args.threads), OMP_NUM_THREADS=str(args.threads))

    nnunet_out = work / "nnunet" / "bench.nii.gz"
    nnunet_out.parent.mkdir(exist_ok=True)
    child = [sys.executable, "-c",
             "import sys, json; sys.path.insert(0, %r); from benchmarks.bench_nnunet import predict_child; from pathlib import Path; "
             "predict_child(Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))" % str(REPO),
             str(results), json.dumps(args.fold), str(ct), str(nnunet_out), str(args.threads)]
    nn_wall, nn_rss, nn_err = run_child(child, env)
    nn_predict = json.loads([line for line in nn_err.splitlines() if line.startswith('{"predict_s"')][-1])["predict_s"]
    ours_wall, ours_rss, ours_err = run_child([sys.executable, str(REPO / "process.py"), "--input", str(work / "in"), "--output", str(work / "ours"),
                                              "--model", str(package), "--runtime", args.runtime, "--precision", args.precision, "--threads", str(args.threads),
                                              "--batch-size", str(args.batch_size)], env)
    results_json = json.loads((work / "ours" / "results.json").read_text())["cases"][0]
    ours_case = sum(v for k, v in results_json["timings_s"].items() if "." not in k)

    channels = np.asarray(card.channel_labels, dtype=np.uint8)
    reference = channels[sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet_out)))]
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "ours" / "images" / "muscle-segmentation" / "bench.mha")))
    agreement = float((reference == ours).mean())
    dice = {}
    for value in np.union1d(np.unique(reference), np.unique(ours)):
        a, b = reference == value, ours == value
        if value and max(a.sum(), b.sum()) >= 100:
            dice[int(value)] = float(2 * (a & b).sum() / (a.sum() + b.sum()))

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, our batch {args.batch_size}"
    print(f"\nCT {shape[2]}x{shape[1]}x{shape[0]} at {args.spacing}x{args.spacing}x{args.slice_spacing} mm; model tile "
          f"{card.tile_size[0]}x{card.tile_size[1]} at {card.pixel_spacing_mm[0]} mm, {card.num_classes} classes; {machine}\n")
    print("| run | process, start to end (s) | case: read to written (s) | per slice (ms) | peak RSS (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| nnUNetPredictor (torch CPU, no mirroring, step 0.5) | {nn_wall:.1f} | {nn_predict:.1f} | {1000 * nn_predict / shape[0]:.0f} | {nn_rss:.0f} |")
    print(f"| ours: process.py, {args.runtime} {args.precision} (network {results_json['timings_s']['segment.network']:.1f} s) | {ours_wall:.1f} | {ours_case:.1f} | {1000 * ours_case / shape[0]:.0f} | {ours_rss:.0f} |")
    print(f"\nspeed ratio (nnUNetPredictor / ours): {nn_predict / ours_case:.2f}x per case, {nn_wall / ours_wall:.2f}x process to process; "
          f"voxel agreement {100 * agreement:.4f}%, per-label Dice min {min(dice.values()) if dice else float('nan'):.4f} "
          f"over {len(dice)} labels with >= 100 voxels")
    print(json.dumps({"nnunet_wall_s": nn_wall, "nnunet_predict_s": nn_predict, "nnunet_rss_mib": nn_rss, "ours_wall_s": ours_wall,
                      "ours_case_s": ours_case, "ours_rss_mib": ours_rss, "agreement": agreement, "dice": dice, "machine": machine,
                      "ct_shape_zyx": list(shape), "work": str(work)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
