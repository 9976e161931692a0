"""nnU-Net v2 in the tests: a real, small 2D model trained from sparse phantom annotations, and nnUNetPredictor.

nnU-Net is a test-only dependency (requirements/nnunet-test.txt). Its plan/preprocess/train steps run in
a child process (`python tests/nnunet_helpers.py train ...`): nnU-Net reads its nnUNet_raw /
nnUNet_preprocessed / nnUNet_results folders from the environment when it is first imported, and its
preprocessing starts worker processes.

The model is nnU-Net's own 2D plan for the phantom slices with the features capped (TINY_FEATURES) so
that a short CPU training learns the phantoms' muscles; the trainer is nnU-Net's stock nnUNetTrainer
with what `nnUNetTrainer_2000epochs_NoMirroring` changes (no mirroring), a few short epochs, and Adam
(the stock SGD learns nothing in so few iterations).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID}_TrunkTest"
TRAINER = "nnUNetTrainer_TrunksegTest"
PLANS = "nnUNetPlans"
CONFIGURATION = "2d"
TINY_FEATURES = 32



#: the CT normalisation and resampling entries of an nnU-Net v2 2D plans configuration, as nnU-Net writes them
NNUNET_2D_PREPROCESSING = {
    "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
    "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}

def nnunet_importable() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def skip_without_nnunet():
    """pytest skip (fail in CI, where nnU-Net must be installed) when nnunetv2 is not importable."""
    import pytest

    if nnunet_importable():
        return
    reason = "nnunetv2 is not installed (test-only: pip install --no-deps nnunetv2 and -r requirements/nnunet-test.txt)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the nnU-Net interoperability tests: {reason}")
    pytest.skip(reason)


def nnunet_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "nnUNet_raw"),
        nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
        nnUNet_results=str(root / "nnUNet_results"),
        nnUNet_n_proc_DA="0",  # training: single-threaded data augmentation (set to 1 for planning in the child)
        nnUNet_def_n_proc="1",
        nnUNet_compile="false",
        PYTHONPATH=str(REPO),
    )
    return env


def results_folder(root: Path) -> Path:
    return root / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__{PLANS}__{CONFIGURATION}"


def train_tiny_model(root: Path, *, epochs: int, iterations: int, timeout: float = 900) -> Path:
    """Plan, preprocess and train fold 0 on the dataset in root/nnUNet_raw/DATASET_NAME; return the results folder.

    fold_1 is a stand-in second fold for the ensemble tests: the fold-0 weights of the middle epoch.
    """
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "train", str(root), str(epochs), str(iterations)],
        env=nnunet_env(root), capture_output=True, text=True, timeout=timeout,
    )
    (root / "nnunet_train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"nnU-Net plan/preprocess/train failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    folder = results_folder(root)
    print(f"nnU-Net plan/preprocess/train: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return folder


def _trainer_class():
    import torch
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_TrunksegTest(nnUNetTrainer):
        """nnUNetTrainer_2000epochs_NoMirroring's settings, a few short epochs, and Adam."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ.get("TRUNKSEG_TEST_EPOCHS", "4"))
            self.num_iterations_per_epoch = int(os.environ.get("TRUNKSEG_TEST_ITERATIONS", "25"))
            self.num_val_iterations_per_epoch = 2
            self.initial_lr = 1e-2
            self.save_every = 10**6

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, initial_patch_size, None

        def on_epoch_end(self):
            super().on_epoch_end()
            if self.current_epoch == self.num_epochs // 2:  # stand-in second fold for the ensemble tests
                self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_half.pth"))

    nnUNetTrainer_TrunksegTest.__name__ = TRAINER
    return nnUNetTrainer_TrunksegTest


def shrink_plans(path: Path) -> None:
    """Cap the 2d configuration's features at TINY_FEATURES (a CPU-sized network of nnU-Net's own layout)."""
    plans = json.loads(path.read_text())
    arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(f, TINY_FEATURES) for f in arch["features_per_stage"]]
    path.write_text(json.dumps(plans, indent=2))


def _train_main(root: Path, epochs: int, iterations: int) -> None:
    import random

    import torch

    os.environ["TRUNKSEG_TEST_EPOCHS"] = str(epochs)
    os.environ["TRUNKSEG_TEST_ITERATIONS"] = str(iterations)
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner divides threads by it
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    t = time.perf_counter()
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([DATASET_ID])
    pre = root / "nnUNet_preprocessed" / DATASET_NAME
    shrink_plans(pre / f"{PLANS}.json")
    preprocess([DATASET_ID], plans_identifier=PLANS, configurations=(CONFIGURATION,), num_processes=(1,), verbose=False)
    raw_splits = root / "nnUNet_raw" / DATASET_NAME / "splits_final.json"
    if raw_splits.is_file():
        shutil.copy(raw_splits, pre / "splits_final.json")
    print(f"fingerprint+plan+preprocess {time.perf_counter() - t:.1f} s", flush=True)

    os.environ["nnUNet_n_proc_DA"] = "0"
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
    dataset_json = json.loads((pre / "dataset.json").read_text())
    t = time.perf_counter()
    trainer = _trainer_class()(plans, CONFIGURATION, 0, dataset_json, device=torch.device("cpu"))
    trainer.run_training()
    print(f"training {time.perf_counter() - t:.1f} s", flush=True)
    fold0 = Path(trainer.output_folder)
    fold1 = fold0.parent / "fold_1"
    fold1.mkdir(exist_ok=True)
    shutil.move(str(fold0 / "checkpoint_half.pth"), str(fold1 / "checkpoint_final.pth"))


# --- nnUNetPredictor ---------------------------------------------------------------------------------

def nnunet_predictor(folder: Path, folds: list, *, use_mirroring: bool = False, tile_step_size: float = 0.5, checkpoint: str = "checkpoint_final.pth"):
    """nnUNetPredictor for a results folder, built the way initialize_from_trained_model_folder builds it.

    manual_initialization instead of initialize_from_trained_model_folder: the latter looks the trainer
    class up by name, and the tests' trainer is not part of nnunetv2 (its network is the stock one).
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    dataset_json = json.loads((folder / "dataset.json").read_text())
    parameters, trainer_name, configuration = [], None, None
    for fold in folds:
        ckpt = torch.load(folder / f"fold_{fold}" / checkpoint, map_location="cpu", weights_only=False)  # our own file
        trainer_name = trainer_name or ckpt["trainer_name"]
        configuration = configuration or ckpt["init_args"]["configuration"]
        parameters.append(ckpt["network_weights"])
    configuration_manager = plans_manager.get_configuration(configuration)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    network.load_state_dict(parameters[0])
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json, trainer_name, None)
    return predictor


def nnunet_predict_file(predictor, ct_path: Path) -> np.ndarray:
    """nnUNetPredictor's label map (z, y, x, in the file's voxel order) of one CT file, read with nnU-Net's SimpleITKIO."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    data, properties = SimpleITKIO().read_images([str(ct_path)])
    return np.asarray(predictor.predict_single_npy_array(data, properties, None, None, False))


def save_nnunet_checkpoint(network, path: Path, *, configuration: str = CONFIGURATION, trainer: str = "nnUNetTrainer", extra: dict | None = None) -> Path:
    """A checkpoint as nnUNetTrainer.save_checkpoint writes it (numpy scalars in the log, a torch.device in init_args)."""
    import torch

    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": {},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)], "dice_per_class_or_region": [[np.float32(0.5)]],
                    "train_losses": [np.float64(-0.1)], "epoch_start_timestamps": [1.0]},
        "_best_ema": np.float64(0.5),
        "current_epoch": 1,
        "init_args": {"plans": {}, "configuration": configuration, "fold": 0, "dataset_json": {}, "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": None,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "train":
        _train_main(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit("usage: nnunet_helpers.py train ROOT EPOCHS ITERATIONS")
