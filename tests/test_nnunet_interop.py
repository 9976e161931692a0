"""nnU-Net v2 interoperability: prepare sparse annotations for nnU-Net, import its models, prove the same output.

Without nnunetv2 (a test-only dependency) the tests that need it skip, except in CI (CI=true), where
they fail. The rest (dataset preparation, label names, plans formats, checkpoint safety, errors) runs
with torch and dynamic-network-architectures alone, on checkpoints written the way nnU-Net writes them.

The nnU-Net model: phantom volumes with sparse labels (level mid-slices, the rest IGNORE; one phantom
stored RAS, one slice only partly annotated) -> training.prepare_nnunet -> nnU-Net's fingerprint, plan
and preprocess for 2d -> a short CPU training (tests/nnunet_helpers.py) -> model.import_nnunet ->
process.py. nnUNetPredictor (no mirroring, tile step 0.5) on the same CT file is the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import process
from model.import_nnunet import (
    PLAIN,
    RESENC,
    architecture_of,
    canonical_label,
    channel_labels_of,
    import_nnunet,
    load_checkpoint,
    transposed_frame,
)
from common.labels import IGNORE, LABELS, NAMES, mirror_label
from model.package import load_model_package
from common.errors import InputError, ModelPackageError
from tests import nnunet_helpers as nh
from tests.conftest import store_in_frame, write_volume
from model.phantom import make_phantom
from training.prepare_nnunet import SLICE_SPACING_MM, prepare

TRAIN_SEEDS = (910_001, 910_002, 910_003, 910_004, 910_005, 910_006)
HELD_OUT_SEED = 910_777
SIZE, PIXEL_MM, N_SLICES = 128, 3.0, 39  # 3 slices per level; the mid-slice of each is annotated
MIN_VOXELS_FOR_DICE = 100


# --- helpers -----------------------------------------------------------------------------------------

def dice_per_label(a: np.ndarray, b: np.ndarray, *, min_voxels: int = 0) -> dict[int, float]:
    out = {}
    for value in np.union1d(np.unique(a), np.unique(b)):
        x, y = a == value, b == value
        if value == 0 or max(x.sum(), y.sum()) < min_voxels:
            continue
        out[int(value)] = float(2 * (x & y).sum() / (x.sum() + y.sum()))
    return out


def to_lps(labels_zyx: np.ndarray, like: Path) -> np.ndarray:
    """A label map on the grid of image file `like`, reoriented to LPS (SimpleITK, independent of our code)."""
    reference = sitk.ReadImage(str(like))
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels_zyx))
    image.CopyInformation(reference)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def run_ours(package: Path, ct: Path, work: Path, runtime: str = "onnxruntime") -> tuple[np.ndarray, float]:
    """process.py on one CT file: (label map in the file's voxel order, seconds)."""
    inp, out = work / "in", work / "out"
    inp.mkdir(parents=True, exist_ok=True)
    shutil.copy(ct, inp / ct.name)
    started = time.perf_counter()
    assert process.main(["--input", str(inp), "--output", str(out), "--model", str(package), "--runtime", runtime, "--format", "mha"]) == 0
    seconds = time.perf_counter() - started
    name = ct.name.split(".")[0]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / process.OUTPUT_SLUG / f"{name}.mha"))), seconds


def assert_same(reference: np.ndarray, ours: np.ndarray, what: str) -> dict:
    agreement = float((reference == ours).mean())
    dice = dice_per_label(reference, ours, min_voxels=MIN_VOXELS_FOR_DICE)
    print(f"{what}: voxel agreement {agreement:.6f}, min per-label Dice {min(dice.values()):.4f} over {len(dice)} labels")
    assert agreement >= 0.999, f"{what}: voxel agreement {agreement:.5f} < 99.9%"
    assert min(dice.values()) >= 0.99, f"{what}: per-label Dice {dice}"
    assert len(dice) >= 5, f"{what}: too few labels to compare ({dice})"
    return {"agreement": agreement, "min_dice": min(dice.values())}


def write_phantom_files(phantom, folder: Path, name: str, frame: str = "LPS", *, sparse: np.ndarray | None = None) -> tuple[Path, Path]:
    ct, geometry = store_in_frame(phantom.ct_zyx, phantom.geometry, frame)
    labels, _ = store_in_frame(phantom.sparse_labels_zyx if sparse is None else sparse, phantom.geometry, frame)
    return (write_volume(ct, folder / "images" / f"{name}.nii.gz", **geometry),
            write_volume(labels, folder / "labels" / f"{name}.nii.gz", **geometry))


# --- the dataset, without nnU-Net ------------------------------------------------------------------------

@dataclass
class Dataset:
    root: Path
    raw: Path
    phantoms: dict
    partly_annotated: tuple[str, int]  # (case, slice) whose left half is IGNORE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("nnunet")
    sources = root / "sources"
    phantoms = {}
    partly = None
    for i, seed in enumerate(TRAIN_SEEDS):
        phantom = make_phantom(seed, size_xy=(SIZE, SIZE), spacing_mm=(PIXEL_MM, PIXEL_MM, 3.0), n_slices=N_SLICES)
        name = f"ph{i}"
        sparse = phantom.sparse_labels_zyx.copy()
        if i == 1:  # one slice only partly annotated: its left half stays IGNORE
            k = int(phantom.mid_slices[6])
            sparse[k, :, SIZE // 2 :] = IGNORE
            partly = (name, k)
        frame = "RAS" if i == 2 else "LPS"  # one CT stored in another voxel order: prepare reorients it
        write_phantom_files(phantom, sources, name, frame, sparse=sparse)
        phantoms[name] = (phantom, sparse)
    raw = root / "nnUNet_raw" / nh.DATASET_NAME
    prepare(sources / "images", sources / "labels", raw, frame="LPS", n_folds=3, log=lambda m: None)
    return Dataset(root, raw, phantoms, partly)


def test_prepare_writes_each_annotated_slice_as_a_2d_case(dataset):
    meta = json.loads((dataset.raw / "dataset.json").read_text())
    images = sorted((dataset.raw / "imagesTr").glob("*_0000.nii.gz"))
    assert len(images) == meta["numTraining"] == 13 * len(TRAIN_SEEDS)
    present = sorted({int(v) for _, sparse in dataset.phantoms.values() for v in np.unique(sparse) if v not in (0, IGNORE)})
    assert meta["labels"]["background"] == 0
    assert [meta["labels"][NAMES[v]] for v in present] == list(range(1, len(present) + 1))
    assert meta["labels"]["ignore"] == len(present) + 1  # nnU-Net: the ignore label is the highest value
    assert meta["channel_names"] == {"0": "CT"} and meta["trunkseg_frame"] == "LPS"
    splits = json.loads((dataset.raw / "splits_final.json").read_text())
    for fold in splits:  # patients never straddle training and validation
        assert not {c.split("_z")[0] for c in fold["train"]} & {c.split("_z")[0] for c in fold["val"]}

    # every slice is the phantom's annotated slice, in LPS, even the phantom stored RAS
    lut = {NAMES[v]: meta["labels"][NAMES[v]] for v in present}
    for name in ("ph0", "ph2"):
        phantom, sparse = dataset.phantoms[name]
        for k in phantom.mid_slices[[0, 6, 12]]:
            image = sitk.ReadImage(str(dataset.raw / "imagesTr" / f"{name}_z{k:04d}_0000.nii.gz"))
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.raw / "labelsTr" / f"{name}_z{k:04d}.nii.gz")))
            assert image.GetSize() == (SIZE, SIZE, 1)
            assert image.GetSpacing()[:2] == pytest.approx((PIXEL_MM, PIXEL_MM)) and image.GetSpacing()[2] == SLICE_SPACING_MM
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[0], phantom.ct_zyx[k])
            expected = np.zeros_like(sparse[k])
            for v in present:
                expected[sparse[k] == v] = lut[NAMES[v]]
            np.testing.assert_array_equal(label[0], expected)
    case, k = dataset.partly_annotated
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.raw / "labelsTr" / f"{case}_z{k:04d}.nii.gz")))[0]
    assert (label[:, SIZE // 2 :] == meta["labels"]["ignore"]).all() and (label[:, : SIZE // 2] != meta["labels"]["ignore"]).all()


def test_prepare_refuses_what_nnunet_cannot_learn_from(tmp_path):
    phantom = make_phantom(5, size_xy=(32, 32), spacing_mm=(3.0, 3.0, 3.0), n_slices=13)
    ct, geometry = phantom.ct_zyx, phantom.geometry
    write_volume(ct, tmp_path / "images" / "a.nii.gz", spacing=geometry.spacing_mm, origin=geometry.origin_mm)
    write_volume(phantom.sparse_labels_zyx, tmp_path / "labels" / "a.nii.gz", spacing=(2.0, 3.0, 3.0), origin=geometry.origin_mm)
    with pytest.raises(InputError, match="does not match the CT"):
        prepare(tmp_path / "images", tmp_path / "labels", tmp_path / "Dataset001_X", log=lambda m: None)
    bad = phantom.sparse_labels_zyx.copy()
    bad[0, 0, 0] = 77
    write_volume(bad, tmp_path / "labels" / "a.nii.gz", spacing=geometry.spacing_mm, origin=geometry.origin_mm)
    with pytest.raises(InputError, match=r"label values \[77\]"):
        prepare(tmp_path / "images", tmp_path / "labels", tmp_path / "Dataset001_X", log=lambda m: None)
    with pytest.raises(InputError, match="DatasetNNN_Name"):
        prepare(tmp_path / "images", tmp_path / "labels", tmp_path / "TrunkMuscle", log=lambda m: None)
    (tmp_path / "labels" / "a.nii.gz").unlink()
    with pytest.raises(InputError, match="no label volume"):
        prepare(tmp_path / "images", tmp_path / "labels", tmp_path / "Dataset001_X", log=lambda m: None)


# --- import pieces, without nnU-Net ---------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("psoas_major_left", "psoas_major_left"),
    ("Psoas major L", "psoas_major_left"),
    ("left psoas", "psoas_major_left"),
    ("M. erector spinae right", "erector_spinae_right"),
    ("R_Multifidus", "transversospinalis_right"),
    ("Obliquus externus abdominis (sin)", "external_oblique_left"),
    ("Latissimus-Dorsi_Rt", "latissimus_dorsi_right"),
    ("QL_L", "quadratus_lumborum_left"),
])
def test_label_names_map_to_the_canonical_muscles(name, expected):
    assert NAMES[canonical_label(name)] == expected


def test_label_mapping_errors_and_overrides():
    dataset = {"labels": {"background": 0, "psoas_L": 1, "autochthon_left": 2, "ignore": 3}}
    with pytest.raises(ModelPackageError, match="autochthon_left.*--label-map"):
        channel_labels_of(dataset)
    channels, mapping = channel_labels_of(dataset, {"autochthon_left": "erector_spinae_left"})
    assert channels == (0, LABELS["psoas_major_left"], LABELS["erector_spinae_left"]) and mapping["psoas_L"] == "psoas_major_left"
    with pytest.raises(ModelPackageError, match="both map"):
        channel_labels_of({"labels": {"background": 0, "psoas_L": 1, "left psoas": 2}})
    with pytest.raises(ModelPackageError, match="region"):
        channel_labels_of({"labels": {"background": 0, "psoas_L": [1, 2]}})
    with pytest.raises(ModelPackageError, match="consecutive"):
        channel_labels_of({"labels": {"background": 0, "psoas_L": 2}})


def test_transposed_plans_give_the_frame_the_network_sees():
    assert transposed_frame("LPS", [0, 1, 2]) == "LPS"
    assert transposed_frame("LPS", [0, 2, 1]) == "PLS"  # y and x swapped in-plane
    assert transposed_frame("RAS", [2, 0, 1]) == "ASR"  # slices along file x: the network's z is R
    # cross-check with arrays: the file's (z, y, x) transposed, read with the frame's axis letters
    letters = {0: "S", 1: "P", 2: "L"}  # LPS file: numpy axis -> direction
    for tf in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0]):
        assert transposed_frame("LPS", tf) == "".join(letters[tf[k]] for k in (2, 1, 0))


def _plans(architecture: dict | None = None, *, old_format: bool = False, network=PLAIN, features=(8, 16, 16)) -> dict:
    n = len(features)
    config = {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [64, 64], "median_image_size_in_voxels": [64.0, 64.0], "spacing": [2.0, 2.0],
        **nh.NNUNET_2D_PREPROCESSING,
        "batch_dice": True,
    }
    blocks = "n_conv_per_stage" if network == PLAIN else "n_blocks_per_stage"
    if old_format:
        config.update({"UNet_class_name": network.rsplit(".", 1)[1], "UNet_base_num_features": features[0],
                       "unet_max_num_features": max(features), "n_conv_per_stage_encoder": [2] * n,
                       "n_conv_per_stage_decoder": [2] * (n - 1), "num_pool_per_axis": [n - 1, n - 1],
                       "pool_op_kernel_sizes": [[1, 1]] + [[2, 2]] * (n - 1), "conv_kernel_sizes": [[3, 3]] * n})
    else:
        config["architecture"] = architecture or {
            "network_class_name": network,
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv2d",
                "kernel_sizes": [[3, 3]] * n, "strides": [[1, 1]] + [[2, 2]] * (n - 1), blocks: [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }
    return {
        "dataset_name": "Dataset777_Synthetic", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [3.0, 2.0, 2.0],
        "original_median_shape_after_transp": [1, 64, 64], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"2d": config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 300.0, "mean": 40.0, "median": 45.0, "min": -200.0,
                                                              "percentile_00_5": -150.0, "percentile_99_5": 250.0, "std": 60.0}},
    }


SYNTHETIC_LABELS = {"background": 0, "psoas_major_right": 1, "Psoas major L": 2, "erector spinae R": 3}


def synthetic_results(folder: Path, plans: dict, *, folds=(0,), labels=SYNTHETIC_LABELS, seed: int = 0) -> Path:
    """An nnU-Net results folder with randomly initialised networks (built by our code from the plans)."""
    import torch

    from model.network import build_network

    model = folder / "nnUNetTrainer__nnUNetPlans__2d"
    model.mkdir(parents=True, exist_ok=True)
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
                                                    "file_ending": ".nii.gz", "trunkseg_frame": "LPS"}))
    name, kwargs = architecture_of(plans["configurations"]["2d"], "2d")
    for fold in folds:
        torch.manual_seed(seed + int(fold) if str(fold).isdigit() else seed)
        network = build_network(network_class_name=name, arch_kwargs=kwargs, input_channels=1, num_classes=len(labels))
        for p in network.parameters():  # break InstanceNorm's symmetry so outputs differ per class
            p.data += 0.05 * torch.randn_like(p)
        nh.save_nnunet_checkpoint(network, model / f"fold_{fold}" / "checkpoint_final.pth")
    return model


def test_import_reads_current_and_older_plans_alike(tmp_path):
    current = synthetic_results(tmp_path / "current", _plans())
    older = synthetic_results(tmp_path / "older", _plans(old_format=True))
    a = import_nnunet(current, folds=["0"], out=tmp_path / "pa", log=lambda m: None)
    b = import_nnunet(older, folds=["0"], out=tmp_path / "pb", log=lambda m: None)
    card_a, card_b = load_model_package(a).card, load_model_package(b).card
    assert card_a.network_class_name == card_b.network_class_name == PLAIN
    assert card_a.arch_kwargs == card_b.arch_kwargs
    assert card_a.channel_labels == (0, LABELS["psoas_major_right"], LABELS["psoas_major_left"], LABELS["erector_spinae_right"])
    assert card_a.frame == "LPS" and card_a.pixel_spacing_mm == (2.0, 2.0) and card_a.tile_size == (64, 64)
    assert (card_a.normalization.clip_low, card_a.normalization.clip_high, card_a.normalization.mean, card_a.normalization.std) == (-150, 250, 40, 60)
    assert card_a.provenance["frame_source"].startswith("dataset.json")


@pytest.mark.parametrize("network", [PLAIN, RESENC])
def test_imported_onnx_and_torch_reproduce_the_checkpoint(tmp_path, network):
    import torch

    from model.network import build_network
    from model.runtimes.cpu import OnnxRuntimeRunner, TorchRunner

    results = synthetic_results(tmp_path / "r", _plans(network=network), folds=(0, 1))
    checkpoints = [torch.load(results / f"fold_{f}" / "checkpoint_final.pth", weights_only=False)["network_weights"] for f in (0, 1)]
    name, kwargs = architecture_of(_plans(network=network)["configurations"]["2d"], "2d")
    tiles = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    expected = []
    for weights in checkpoints:
        net = build_network(network_class_name=name, arch_kwargs=kwargs, input_channels=1, num_classes=4)
        net.load_state_dict(weights)
        with torch.no_grad():
            expected.append(net.eval()(torch.from_numpy(tiles)).numpy())
    for folds, want in ((["0"], expected[0]), (["0", "1"], (expected[0] + expected[1]) / 2)):  # nnU-Net averages fold logits
        package = load_model_package(import_nnunet(results, folds=folds, out=tmp_path / f"p{len(folds)}", log=lambda m: None))
        for runner in (OnnxRuntimeRunner(package), TorchRunner(package)):
            with runner as run:
                np.testing.assert_allclose(run(tiles), want, atol=2e-4 * max(1.0, np.abs(want).max()))


def test_checkpoints_are_read_without_running_pickled_code(tmp_path):
    import torch

    results = synthetic_results(tmp_path / "r", _plans())
    assert load_checkpoint(results / "fold_0" / "checkpoint_final.pth")["_best_ema"] == 0.5  # numpy scalars allowed
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"network_weights": {}, "payload": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(ModelPackageError, match="refused to unpickle"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_import_errors_are_clear(tmp_path):
    plans = _plans()
    results = synthetic_results(tmp_path / "r", plans, folds=(0,))

    def attempt(**kwargs):
        options = {"folds": ["0"], "out": tmp_path / f"out{len(list(tmp_path.iterdir()))}", "log": lambda m: None}
        options.update(kwargs)
        return import_nnunet(results, **options)

    with pytest.raises(ModelPackageError, match="fold 3 missing"):
        attempt(folds=["3"])
    truncated = results / "fold_0" / "checkpoint_final.pth"
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelPackageError, match="truncated or corrupt"):
        attempt()
    truncated.write_bytes(whole)
    with pytest.raises(ModelPackageError, match="contradicts"):
        attempt(frame="RAS")

    broken = json.loads(json.dumps(plans))
    broken["configurations"]["2d"]["architecture"]["network_class_name"] = "my_lab.nets.FancyUNet"
    (results / "plans.json").write_text(json.dumps(broken))
    with pytest.raises(ModelPackageError, match="unknown architecture 'my_lab.nets.FancyUNet'"):
        attempt()
    three_d = json.loads(json.dumps(plans))
    three_d["configurations"]["2d"]["patch_size"] = [32, 64, 64]
    (results / "plans.json").write_text(json.dumps(three_d))
    with pytest.raises(ModelPackageError, match="not 2D"):
        attempt()
    (results / "plans.json").write_text(json.dumps(plans))

    dataset = json.loads((results / "dataset.json").read_text())
    more = dict(dataset, labels={**SYNTHETIC_LABELS, "quadratus_lumborum_left": 4})
    (results / "dataset.json").write_text(json.dumps(more))
    with pytest.raises(ModelPackageError, match="4 output channels; dataset.json lists 5"):
        attempt()
    (results / "dataset.json").write_text(json.dumps(dict(dataset, channel_names={"0": "CT", "1": "CT"})))
    with pytest.raises(ModelPackageError, match="2 input channels"):
        attempt()
    (results / "dataset.json").write_text(json.dumps({k: v for k, v in dataset.items() if k != "trunkseg_frame"}))
    with pytest.raises(ModelPackageError, match="cannot tell the axis frame"):
        attempt()
    package = attempt(frame="lps")
    assert load_model_package(package).card.provenance["frame_source"] == "--frame option"


def test_import_reads_the_frame_of_a_training_image(tmp_path):
    results = synthetic_results(tmp_path / "r", _plans())
    dataset = json.loads((results / "dataset.json").read_text())
    (results / "dataset.json").write_text(json.dumps({k: v for k, v in dataset.items() if k != "trunkseg_frame"}))
    phantom = make_phantom(3, size_xy=(32, 32), spacing_mm=(2.0, 2.0, 3.0), n_slices=4)
    array, geometry = store_in_frame(phantom.ct_zyx, phantom.geometry, "RAS")
    image = write_volume(array, tmp_path / "case_0000.nii.gz", **geometry)
    card = load_model_package(import_nnunet(results, folds=["0"], out=tmp_path / "p", training_image=image, log=lambda m: None)).card
    assert card.frame == "RAS" and card.provenance["frame_source"] == f"training image {image}"


# --- against nnU-Net itself --------------------------------------------------------------------------------

@dataclass
class Trained:
    root: Path
    results: Path
    package: Path  # fold 0
    ensemble: Path  # folds 0 and 1
    ct: Path  # held-out phantom CT, LPS
    phantom: object
    phantom_iso: object  # another held-out phantom, 4 mm slices


@pytest.fixture(scope="module")
def trained(dataset) -> Trained:
    nh.skip_without_nnunet()
    results = nh.train_tiny_model(dataset.root, epochs=int(os.environ.get("TRUNKSEG_NNUNET_EPOCHS", "16")),
                                  iterations=int(os.environ.get("TRUNKSEG_NNUNET_ITERATIONS", "25")))
    package = import_nnunet(results, folds=["0"], out=dataset.root / "pkg-fold0", log=lambda m: None)
    ensemble = import_nnunet(results, folds=["0", "1"], out=dataset.root / "pkg-folds01", log=lambda m: None)
    # held out: another patient, another pixel spacing (resampled), non-square, several tiles per slice
    phantom = make_phantom(HELD_OUT_SEED, size_xy=(176, 150), spacing_mm=(2.3, 2.6, 3.0), n_slices=26)
    ct = write_volume(phantom.ct_zyx, dataset.root / "held-out" / "heldout.nii.gz", spacing=phantom.geometry.spacing_mm,
                      origin=phantom.geometry.origin_mm)
    phantom_iso = make_phantom(HELD_OUT_SEED + 1, size_xy=(176, 150), spacing_mm=(2.3, 2.6, 4.0))
    return Trained(dataset.root, results, package, ensemble, ct, phantom, phantom_iso)


@pytest.fixture(scope="module")
def reference(trained) -> np.ndarray:
    """nnUNetPredictor's labels for the held-out CT, as canonical label values."""
    predictor = nh.nnunet_predictor(trained.results, [0])
    return to_canonical(trained, nh.nnunet_predict_file(predictor, trained.ct))


def to_canonical(trained: Trained, nnunet_labels: np.ndarray) -> np.ndarray:
    channels = np.asarray(load_model_package(trained.package).card.channel_labels, dtype=np.uint8)
    return channels[nnunet_labels]


@pytest.fixture(scope="module")
def ours(trained, tmp_path_factory) -> np.ndarray:
    """Our container (process.py, ONNX Runtime) on the same CT file, with the imported fold-0 package."""
    return run_ours(trained.package, trained.ct, tmp_path_factory.mktemp("ours"))[0]


def test_imported_model_reproduces_nnunet_predictor(reference, ours):
    assert_same(reference, ours, "fold 0, onnxruntime")


def test_imported_ensemble_reproduces_nnunet_predictor(trained, tmp_path):
    predictor = nh.nnunet_predictor(trained.results, [0, 1])
    reference = to_canonical(trained, nh.nnunet_predict_file(predictor, trained.ct))
    card = load_model_package(trained.ensemble).card
    assert card.network_class_name == "model.network.FoldEnsemble" and card.provenance["folds"] == ["0", "1"]
    for runtime in ("onnxruntime", "torch"):
        ours, _ = run_ours(trained.ensemble, trained.ct, tmp_path / runtime, runtime)
        assert_same(reference, ours, f"folds 0+1, {runtime}")


def test_our_output_is_physical_whatever_the_voxel_order_and_nnunets_is_not(trained, reference, tmp_path):
    """The same CT stored RPS (x flipped) and PLI (transposed, z flipped): ours is the same in physical space.

    nnUNetPredictor, given the RPS file, segments the mirrored array as if it were LPS: left and right swap.
    """
    for frame in ("RPS", "PLI"):
        array, geometry = store_in_frame(trained.phantom.ct_zyx, trained.phantom.geometry, frame)
        ct = write_volume(array, tmp_path / frame / "heldout.nii.gz", **geometry)
        ours, _ = run_ours(trained.package, ct, tmp_path / f"ours-{frame}")
        assert_same(reference, to_lps(ours, ct), f"ours, CT stored {frame}")
        if frame == "RPS":
            nnunet = to_lps(to_canonical(trained, nh.nnunet_predict_file(nh.nnunet_predictor(trained.results, [0]), ct)), ct)
    sided = dice_per_label(reference, nnunet, min_voxels=MIN_VOXELS_FOR_DICE)
    mirrored = np.vectorize(lambda v: mirror_label(v) if v else 0, otypes=[np.uint8])(nnunet)
    swapped = dice_per_label(reference, mirrored, min_voxels=MIN_VOXELS_FOR_DICE)
    print(f"nnUNetPredictor on the RPS file: per-side Dice {np.mean(list(sided.values())):.3f}, "
          f"with sides swapped back {np.mean(list(swapped.values())):.3f}")
    assert np.mean(list(sided.values())) < 0.5 < np.mean(list(swapped.values()))


def test_transpose_forward_is_taken_into_account(trained, tmp_path):
    """Plans that transpose y and x: nnU-Net feeds the network transposed slices; so must we (card frame PLS)."""
    results = tmp_path / "transposed" / trained.results.name
    shutil.copytree(trained.results, results, ignore=shutil.ignore_patterns("fold_1", "*.png", "*.txt"))
    plans = json.loads((results / "plans.json").read_text())
    plans["transpose_forward"], plans["transpose_backward"] = [0, 2, 1], [0, 2, 1]
    (results / "plans.json").write_text(json.dumps(plans))
    package = import_nnunet(results, folds=["0"], out=tmp_path / "pkg", log=lambda m: None)
    assert load_model_package(package).card.frame == "PLS"
    reference = to_canonical(trained, nh.nnunet_predict_file(nh.nnunet_predictor(results, [0]), trained.ct))
    ours, _ = run_ours(package, trained.ct, tmp_path / "ours")
    assert_same(reference, ours, "transpose_forward [0, 2, 1]")


def test_near_isotropic_ct_takes_nnunets_3d_resampling_path_and_agrees(trained, tmp_path):
    """4 mm slices at 2.3 x 2.6 mm pixels: nnU-Net resamples the volume at once (not slice by slice)."""
    phantom = trained.phantom_iso
    ct = write_volume(phantom.ct_zyx[30:60], tmp_path / "iso" / "iso.nii.gz", spacing=phantom.geometry.spacing_mm,
                      origin=phantom.geometry.origin_mm[:2] + (phantom.geometry.origin_mm[2] + 30 * phantom.geometry.spacing_mm[2],))
    reference = to_canonical(trained, nh.nnunet_predict_file(nh.nnunet_predictor(trained.results, [0]), ct))
    ours, _ = run_ours(trained.package, ct, tmp_path / "ours")
    assert_same(reference, ours, "near-isotropic CT (3D resampling in nnU-Net)")


@pytest.mark.parametrize("slice_mm, pixel_mm, target_mm", [
    (3.0, (0.8, 0.8), (0.8, 0.8)), (2.0, (0.8, 0.8), (0.8, 0.8)), (1.0, (0.7, 0.7), (1.5, 1.5)),
    (5.0, (1.5, 1.5), (0.8, 0.8)), (0.5, (0.7, 0.7), (0.7, 0.7)), (0.2, (1.0, 1.0), (1.0, 1.0)),
    (2.5, (0.8, 0.3), (0.8, 0.8)), (4.0, (4.0, 1.0), (1.0, 1.0)),
])
def test_resampling_clip_follows_nnunets_slice_by_slice_rule(slice_mm, pixel_mm, target_mm):
    nh.skip_without_nnunet()
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    from model.segment import clip_bounds_per_slice

    separate, axis = determine_do_sep_z_and_axis(None, [slice_mm, pixel_mm[1], pixel_mm[0]], [slice_mm, target_mm[1], target_mm[0]])
    assert clip_bounds_per_slice(slice_mm, pixel_mm, target_mm) == (bool(separate) and axis == 0)


def test_chain_from_sparse_annotations_segments_a_held_out_phantom(trained, ours):
    """Sparse phantoms -> prepare -> nnU-Net plan/preprocess/train -> import -> process.py on a held-out phantom."""
    card = load_model_package(trained.package).card
    assert card.provenance["trainer"] == nh.TRAINER and card.provenance["frame_source"].startswith("dataset.json")
    # our container's output (nnU-Net's, as tested above) against the truth of the held-out phantom's annotated slices
    mids = trained.phantom.mid_slices
    dice = dice_per_label(trained.phantom.labels_zyx[mids], ours[mids], min_voxels=200)
    print(f"held-out phantom, level mid-slices: per-muscle Dice {json.dumps({NAMES[k]: round(v, 3) for k, v in dice.items()})}")
    assert len(dice) >= 10
    assert np.median(list(dice.values())) >= float(os.environ.get("TRUNKSEG_NNUNET_MIN_DICE", "0.6"))


def test_reduced_precisions_on_the_imported_trained_model_are_measured_and_gated(trained, tmp_path):
    """The CPU's reduced modes (OpenVINO bf16, int8, int8+bf16; ONNX Runtime int8) on the nnU-Net-trained model:
    each measured against fp32 on the held-out phantom, and `auto` takes only the fastest that holds."""
    pytest.importorskip("openvino", reason="OpenVINO is the CPU runtime of bf16 and int8")
    from model.precision import Volume, default_modes, measure_agreement, record_agreement
    from model.runtimes.precision import choose_precision, speed_order
    from model.quantize import quantize_package

    phantom = trained.phantom
    volume = Volume("held-out", phantom.ct_zyx, tuple(phantom.geometry.spacing_mm[:2]), float(phantom.geometry.spacing_mm[2]))
    package = tmp_path / "pkg"
    shutil.copytree(trained.package, package)
    quantize_package(package)  # calibrated on phantom slices at the model's spacing (other seeds than the held-out one)
    modes = default_modes(load_model_package(package))
    assert {"openvino-int8", "onnxruntime-int8"} <= set(modes)
    records = measure_agreement(load_model_package(package), [volume], modes, threads=2)
    for key, record in records.items():
        print(f"nnU-Net-trained model, {key} vs fp32 on the held-out phantom: "
              f"{ {k: record[k] for k in ('holds', 'voxel_agreement', 'min_dice', 'labels_compared')} }")
        assert record["voxel_agreement"] >= 0.99 and record["labels_compared"] >= 10, (key, record)  # close to fp32 either way
        assert record["holds"] == (record["voxel_agreement"] >= 0.999 and record["min_dice"] >= 0.99)
    record_agreement(package, records)
    card = load_model_package(package).card
    expected = next((mode for mode in speed_order("openvino") if records.get(f"openvino-{mode}", {}).get("holds")), "fp32")
    assert choose_precision("auto", runtime="openvino", card=card).name == expected
