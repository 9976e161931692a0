"""Import a trained nnU-Net v2 2D model (a results folder) as our model package.

    python -m model.import_nnunet RESULTS/Dataset501_TrunkMuscle/nnUNetTrainer_2000epochs_NoMirroring__nnUNetPlans__2d \\
        --fold 0 --out model/packages/my-model [--frame LPS | --training-image imagesTr/case_0000.nii.gz]

Reads plans.json, dataset.json and fold_<f>/checkpoint_final.pth and writes model.json, weights
(safetensors) and the ONNX export. No nnU-Net installation is needed, and no pickle is executed:
checkpoints are read with `torch.load(weights_only=True)` and an explicit allow-list of the numpy
types nnU-Net stores in them. The package itself holds no pickle.

What is taken from where:
- architecture: plans' `architecture` (network_class_name, arch_kwargs, _kw_requires_import) or the
  older v2 format (UNet_class_name, UNet_base_num_features, n_conv_per_stage_encoder, ...), for
  PlainConvUNet and ResidualEncoderUNet; layer classes resolved through model/network.py's allow-list.
- normalisation: plans' foreground_intensity_properties_per_channel (CTNormalization: clip to
  percentile_00_5/percentile_99_5, subtract mean, divide by std).
- spacing and tile: the configuration's spacing and patch_size, in the axis order the network sees
  (after plans' transpose_forward).
- labels: dataset.json label names (channel c is the label with value c, as in nnU-Net), mapped by
  name to common/labels.json with an alias table for common spellings and --label-map for the rest.
  An unmapped label is an error.
- frame: nnU-Net does not reorient; a model learns in the voxel order of its training files. The
  frame comes from --frame, from --training-image (read with SimpleITK, as nnU-Net's SimpleITKIO
  reads it), from dataset.json's "trunkseg_frame" (written by training.prepare_nnunet), or from the
  plans' reader when it is NibabelIOWithReorient (always RAS); the card records which. When plans
  transpose the axes (transpose_forward), the card's frame describes the transposed axes, so our
  pipeline slices along the axis the network slices along.
- several folds: one network that returns the mean of the folds' logits, which is what
  nnUNetPredictor does (it sums the logits of every fold, each blended over tiles with the Gaussian,
  and divides by the number of folds; the blending is linear, so the order does not matter).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.labels import LABELS, NAMES
from model.package import NNUNET_LAYERS, ModelCard, Normalization, sha256_of, write_model_card
from common.errors import ModelPackageError, TrunkSegError

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
#: network class names found in plans (current and older nnU-Net / dynamic-network-architectures) -> ours
ARCHITECTURES = {
    PLAIN: PLAIN,
    RESENC: RESENC,
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": RESENC,
    "PlainConvUNet": PLAIN,  # older v2 plans: UNet_class_name
    "ResidualEncoderUNet": RESENC,
}
SUPPORTED_REQUIRES_IMPORT = {"conv_op", "norm_op", "dropout_op", "nonlin"}
FRAME_KEY = "trunkseg_frame"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
DEFAULT_DATA_RESAMPLING = ("resample_data_or_seg_to_shape", 3)
DEFAULT_PROBABILITY_RESAMPLING = ("resample_data_or_seg_to_shape", 1)

# --- labels ------------------------------------------------------------------------------------------

#: spellings of each canonical muscle (without side), after normalisation to lower_snake_case
MUSCLE_ALIASES = {
    "pectoralis_major": ("pectoralis_major", "pectoralis", "pec_major", "pect_major", "pectoralis_maj", "m_pectoralis_major"),
    "rectus_abdominis": ("rectus_abdominis", "rectus_abdominus", "rectus", "rectus_abd"),
    "serratus_anterior": ("serratus_anterior", "serratus", "serratus_ant"),
    "latissimus_dorsi": ("latissimus_dorsi", "latissimus", "lat_dorsi", "latissimus_dorsii"),
    "trapezius": ("trapezius", "trapezoid", "trap"),
    "external_oblique": ("external_oblique", "obliquus_externus", "obliquus_externus_abdominis", "external_abdominal_oblique",
                         "ext_oblique", "oblique_external", "external_obliques"),
    "internal_oblique": ("internal_oblique", "obliquus_internus", "obliquus_internus_abdominis", "internal_abdominal_oblique",
                         "int_oblique", "oblique_internal", "internal_obliques"),
    "erector_spinae": ("erector_spinae", "erector", "erector_spine", "erectores_spinae"),
    "transversospinalis": ("transversospinalis", "transversospinal", "transverso_spinalis", "multifidus"),
    "psoas_major": ("psoas_major", "psoas", "psoas_maj"),
    "quadratus_lumborum": ("quadratus_lumborum", "quadratus", "ql"),
}
_SIDES = {"left": "left", "l": "left", "lt": "left", "sin": "left", "sinister": "left", "sinistra": "left",
          "right": "right", "r": "right", "rt": "right", "dex": "right", "dexter": "right", "dextra": "right"}
_FILLER = {"m", "mm", "muscle", "muscles", "musculus", "mus", "the"}
_ALIAS = {alias: muscle for muscle, aliases in MUSCLE_ALIASES.items() for alias in aliases}


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def canonical_label(name: str) -> int | None:
    """Canonical label value of a dataset label name, or None when it cannot be told."""
    key = normalise_name(name)
    if key in LABELS:
        return LABELS[key]
    tokens = [t for t in key.split("_") if t and t not in _FILLER]
    sides = [i for i in (0, len(tokens) - 1) if tokens and tokens[i] in _SIDES]
    if len(tokens) < 2 or not sides:
        return None
    index = sides[-1] if len(sides) == 1 or tokens[-1] in ("left", "right") else sides[0]
    side = _SIDES[tokens[index]]
    muscle = _ALIAS.get("_".join(tokens[:index] + tokens[index + 1 :]))
    if muscle is None:
        return None
    return LABELS[f"{muscle}_{side}"]


def channel_labels_of(dataset: dict, label_map: dict[str, Any] | None = None) -> tuple[tuple[int, ...], dict[str, str]]:
    """Canonical label of every network output channel, and the name mapping used.

    nnU-Net's channel c is the label whose value is c (labels are consecutive from 0); "ignore" has no channel.
    """
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelPackageError("dataset.json: no 'labels'")
    if all(str(k).isdigit() for k in labels) and not any(str(v).isdigit() for v in labels.values()):
        labels = {str(v): int(k) for k, v in labels.items()}  # value -> name, as nnU-Net v1 wrote it
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            raise ModelPackageError(f"dataset.json: label {name!r} is a region {value}; region-based models are not supported")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise ModelPackageError(f"dataset.json: label {name!r} has no integer value ({value!r})") from None
        if value in by_value:
            raise ModelPackageError(f"dataset.json: labels {by_value[value]!r} and {name!r} share value {value}")
        by_value[value] = name
    if sorted(by_value) != list(range(len(by_value))):
        raise ModelPackageError(f"dataset.json: label values must be consecutive from 0 (nnU-Net's rule), got {sorted(by_value)}")
    overrides = {normalise_name(str(k)): v for k, v in (label_map or {}).items()}
    channels = [0]
    mapping = {by_value[0]: "background"}
    unmapped = []
    for value in range(1, len(by_value)):
        name = by_value[value]
        target = overrides.get(normalise_name(name), overrides.get(name))
        if target is not None:
            canonical = _canonical_target(target, name)
        else:
            canonical = canonical_label(name)
        if canonical is None:
            unmapped.append(name)
            continue
        channels.append(canonical)
        mapping[name] = NAMES[canonical]
    if unmapped:
        raise ModelPackageError(
            f"dataset.json: label(s) {unmapped} do not match a canonical muscle (common/labels.json); give --label-map "
            f"FILE.json with {{\"dataset name\": \"canonical name\"}}, e.g. {{{json.dumps(unmapped[0])}: \"psoas_major_left\"}}"
        )
    seen: dict[int, str] = {}
    for name, canonical in zip([by_value[v] for v in range(len(by_value))], channels):
        if canonical in seen:
            raise ModelPackageError(f"dataset.json: labels {seen[canonical]!r} and {name!r} both map to {NAMES.get(canonical, 'background')!r}")
        seen[canonical] = name
    return tuple(channels), mapping


def _canonical_target(target: Any, name: str) -> int:
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        value = int(target)
        if value in NAMES:
            return value
    elif isinstance(target, str):
        if normalise_name(target) in LABELS:
            return LABELS[normalise_name(target)]
    raise ModelPackageError(f"--label-map: {name!r} -> {target!r} is not a canonical muscle name or value (common/labels.json)")


# --- plans ---------------------------------------------------------------------------------------------

def configuration_of(plans: dict, name: str) -> dict:
    """The configuration `name` of the plans with `inherits_from` resolved (as nnU-Net's PlansManager does)."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise ModelPackageError(f"plans.json: no configuration {name!r} (has {sorted(configurations)})")
    config = dict(configurations[name])
    seen = {name}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configurations:
            raise ModelPackageError(f"plans.json: configuration {name!r} inherits from unknown or circular {parent!r}")
        seen.add(parent)
        merged = dict(configurations[parent])
        merged.update(config)
        config = merged
    return config


def architecture_of(config: dict, config_name: str) -> tuple[str, dict]:
    """(our network class name, arch_kwargs with layer names as strings) of a 2D configuration."""
    if len(config.get("patch_size", [])) != 2:
        raise ModelPackageError(f"plans.json: configuration {config_name!r} is not 2D (patch_size {config.get('patch_size')}); only 2D models are supported")
    if "architecture" in config:
        arch = config["architecture"]
        class_name = arch.get("network_class_name")
        if class_name not in ARCHITECTURES:
            raise ModelPackageError(f"plans.json: unknown architecture {class_name!r} (supported: PlainConvUNet, ResidualEncoderUNet)")
        kwargs = dict(arch.get("arch_kwargs", {}))
        requires = set(arch.get("_kw_requires_import", []))
        if requires - SUPPORTED_REQUIRES_IMPORT:
            raise ModelPackageError(f"plans.json: arch_kwargs {sorted(requires - SUPPORTED_REQUIRES_IMPORT)} name classes this importer does not resolve")
        for key in SUPPORTED_REQUIRES_IMPORT - requires:
            if isinstance(kwargs.get(key), str):
                raise ModelPackageError(f"plans.json: arch_kwargs {key}={kwargs[key]!r} is a class name but not listed in _kw_requires_import")
        network = ARCHITECTURES[class_name]
    elif "UNet_class_name" in config:  # older nnU-Net v2 plans (before the 'architecture' entry, v2.0-2.3)
        class_name = config["UNet_class_name"]
        if class_name not in ARCHITECTURES:
            raise ModelPackageError(f"plans.json: unknown architecture {class_name!r} (supported: PlainConvUNet, ResidualEncoderUNet)")
        network = ARCHITECTURES[class_name]
        try:
            n_stages = len(config["n_conv_per_stage_encoder"])
            blocks = "n_conv_per_stage" if network == PLAIN else "n_blocks_per_stage"
            kwargs = {
                "n_stages": n_stages,
                "features_per_stage": [min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(n_stages)],
                "conv_op": "torch.nn.modules.conv.Conv2d",
                "kernel_sizes": config["conv_kernel_sizes"],
                "strides": config["pool_op_kernel_sizes"],
                blocks: config["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
                **NNUNET_LAYERS,
            }
        except KeyError as error:
            raise ModelPackageError(f"plans.json: older-format configuration {config_name!r} lacks {error}") from None
    else:
        raise ModelPackageError(f"plans.json: configuration {config_name!r} describes no architecture ('architecture' or 'UNet_class_name')")
    if kwargs.get("conv_op") not in ("torch.nn.modules.conv.Conv2d", "torch.nn.Conv2d"):
        raise ModelPackageError(f"plans.json: conv_op {kwargs.get('conv_op')!r} is not a 2D convolution")
    return network, kwargs


def normalization_of(plans: dict, config: dict) -> Normalization:
    schemes = config.get("normalization_schemes")
    if schemes != ["CTNormalization"]:
        raise ModelPackageError(f"plans.json: normalization_schemes {schemes} (only one CT channel with CTNormalization is supported)")
    if any(config.get("use_mask_for_norm", [False])):
        raise ModelPackageError("plans.json: use_mask_for_norm is set; CT normalisation without a mask is expected")
    props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
    if not props:
        raise ModelPackageError("plans.json: no foreground_intensity_properties_per_channel for channel 0")
    try:
        norm = Normalization("CT", float(props["percentile_00_5"]), float(props["percentile_99_5"]), float(props["mean"]), float(max(props["std"], 1e-8)))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelPackageError(f"plans.json: foreground intensity properties incomplete ({error})") from None
    return norm


def check_resampling(config: dict) -> None:
    """Our segmenter resamples data with cubic splines and logits linearly, as nnU-Net's defaults do."""
    for key, (fn, order) in (("resampling_fn_data", DEFAULT_DATA_RESAMPLING), ("resampling_fn_probabilities", DEFAULT_PROBABILITY_RESAMPLING)):
        got_fn = config.get(key, fn)
        got_order = config.get(f"{key}_kwargs", {}).get("order", order)
        if got_fn != fn or got_order != order:
            raise ModelPackageError(f"plans.json: {key} {got_fn} order {got_order}; only nnU-Net's default ({fn}, order {order}) is reproduced")
    if config.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise ModelPackageError(f"plans.json: preprocessor {config['preprocessor_name']!r}; only DefaultPreprocessor is reproduced")


def transposed_frame(training_frame: str, transpose_forward: list[int]) -> str:
    """Frame of the axes the network sees: file axes (numpy z, y, x) permuted by plans' transpose_forward.

    Frame codes name the x, y, z axes; numpy axis k of the file is frame letter 2 - k.
    """
    if sorted(transpose_forward) != [0, 1, 2]:
        raise ModelPackageError(f"plans.json: transpose_forward {transpose_forward} is not a permutation of 0, 1, 2")
    return "".join(training_frame[2 - transpose_forward[k]] for k in (2, 1, 0))


# --- frame ---------------------------------------------------------------------------------------------

def frame_of(*, option: str | None, training_image: Path | None, dataset: dict, plans: dict) -> tuple[str, str]:
    """(frame of the training files, where it came from)."""
    from preprocess.geometry import parse_frame

    candidates = []
    if option:
        candidates.append((option.upper(), "--frame option"))
    if training_image is not None:
        candidates.append((frame_of_image(Path(training_image)), f"training image {training_image}"))
    if dataset.get(FRAME_KEY):
        candidates.append((str(dataset[FRAME_KEY]).upper(), "dataset.json 'trunkseg_frame' (written by training.prepare_nnunet)"))
    reader = plans.get("image_reader_writer")
    if reader == "NibabelIOWithReorient":
        candidates.append(("RAS", "plans.json image_reader_writer NibabelIOWithReorient (reorients every image to RAS)"))
    if not candidates:
        raise ModelPackageError(
            "cannot tell the axis frame the model was trained in: nnU-Net learns in the voxel order of its training files. "
            "Give --frame (e.g. LPS) or --training-image (one of the model's imagesTr files)"
        )
    for frame, source in candidates:
        try:
            parse_frame(frame)
        except ValueError as error:
            raise ModelPackageError(f"{source}: {error}") from None
    frame, source = candidates[0]
    for other, other_source in candidates[1:]:
        if other != frame:
            raise ModelPackageError(f"frame {frame} from {source} contradicts {other} from {other_source}")
    return frame, source


def frame_of_image(path: Path) -> str:
    from preprocess.geometry import Geometry
    from preprocess.io import read_image

    try:
        image = read_image(path)
    except TrunkSegError as error:
        raise ModelPackageError(f"--training-image: {error}") from None
    if image.GetDimension() != 3:
        raise ModelPackageError(f"--training-image {path}: a {image.GetDimension()}D image has no 3D axis frame; give --frame")
    return Geometry.from_image(image).orientation_code()


# --- checkpoints ---------------------------------------------------------------------------------------

def _allowed_globals() -> list:
    """The few non-tensor types nnU-Net checkpoints hold (numpy scalars in the training log), nothing callable beyond."""
    import numpy.dtypes

    allowed: list = [np.dtype, np.ndarray]
    scalar = getattr(getattr(getattr(np, "_core", np), "multiarray"), "scalar", None)
    reconstruct = getattr(getattr(getattr(np, "_core", np), "multiarray"), "_reconstruct", None)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if scalar is not None:
            allowed.append((scalar, f"{module}.scalar"))
        if reconstruct is not None:
            allowed.append((reconstruct, f"{module}._reconstruct"))
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType", "Int8DType",
                 "UInt8DType", "BoolDType"):
        if hasattr(numpy.dtypes, name):
            allowed.append(getattr(numpy.dtypes, name))
    return allowed


def load_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint, read with torch's weights-only unpickler and our allow-list; never arbitrary pickle."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelPackageError(f"{path}: checkpoint missing")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error)
        match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", detail)
        what = f"it holds {match.group(1)}, which is not on the allow-list" if match else detail.splitlines()[0][:200]
        raise ModelPackageError(f"{path}: refused to unpickle the checkpoint ({what})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelPackageError(f"{path}: cannot read the checkpoint, truncated or corrupt ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ModelPackageError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def network_weights(checkpoint: dict, path: Path) -> dict:
    import torch

    weights = {}
    for key, value in checkpoint["network_weights"].items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        if not isinstance(value, torch.Tensor):
            raise ModelPackageError(f"{path}: network weight {key!r} is not a tensor")
        weights[key] = value
    return weights


def load_weights(network, weights: dict, path: Path, *, num_classes: int) -> None:
    """Strictly load `weights` into `network`, with clear errors for channel-count and architecture mismatches."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ModelPackageError(
            f"{path}: weights do not fit the plans' architecture (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); was the model trained with a custom architecture?"
        )
    for key, tensor in expected.items():
        got = tuple(weights[key].shape)
        if got == tuple(tensor.shape):
            continue
        if key.startswith("encoder.stages.0.") and key.endswith(".weight") and len(got) == 4 and got[1] != tensor.shape[1]:
            raise ModelPackageError(f"{path}: the network takes {got[1]} input channels; dataset.json and our CT pipeline give {tensor.shape[1]}")
        if "seg_layers" in key and got[0] != tensor.shape[0]:
            raise ModelPackageError(f"{path}: the network has {got[0]} output channels; dataset.json lists {num_classes} labels")
        raise ModelPackageError(f"{path}: weight {key} has shape {got}, the plans' architecture expects {tuple(tensor.shape)}")
    network.load_state_dict(weights, strict=True)


# --- the import ------------------------------------------------------------------------------------------

def find_model_folder(path: Path, configuration: str | None) -> tuple[Path, str]:
    """(trainer__plans__configuration folder, configuration name); `path` may be that folder or the dataset's."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPackageError(f"{path}: no such nnU-Net results folder")
    if (path / "plans.json").is_file():
        if configuration is None:
            parts = path.name.split("__")
            configuration = parts[2] if len(parts) == 3 else "2d"
        return path, configuration
    wanted = configuration or "2d"
    candidates = sorted(p for p in path.iterdir() if p.is_dir() and p.name.endswith(f"__{wanted}") and (p / "plans.json").is_file())
    if len(candidates) != 1:
        raise ModelPackageError(f"{path}: expected one <trainer>__<plans>__{wanted} folder with plans.json, found {[p.name for p in candidates]}")
    return candidates[0], wanted


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelPackageError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(f"{path}: unreadable ({error})") from None


def import_nnunet(
    results: Path,
    *,
    folds: list[str],
    out: Path,
    configuration: str | None = None,
    frame: str | None = None,
    training_image: Path | None = None,
    label_map: dict | None = None,
    checkpoint_name: str = DEFAULT_CHECKPOINT,
    name: str | None = None,
    version: str = "1",
    overwrite: bool = False,
    log=print,
) -> Path:
    """Write a model package for the nnU-Net model in `results`; return the package folder."""
    import torch
    from safetensors.torch import save_model

    from model.export import export_onnx
    from model.network import ENSEMBLE_CLASS, build_network

    folder, config_name = find_model_folder(results, configuration)
    plans = _load_json(folder / "plans.json")
    dataset = _load_json(folder / "dataset.json")
    config = configuration_of(plans, config_name)
    network_class, arch_kwargs = architecture_of(config, config_name)
    check_resampling(config)
    norm = normalization_of(plans, config)
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise ModelPackageError(f"{folder / 'dataset.json'}: {len(channels)} input channels {channels}; our pipeline gives one CT channel")
    channel_labels, mapping = channel_labels_of(dataset, label_map)
    training_frame, frame_source = frame_of(option=frame, training_image=training_image, dataset=dataset, plans=plans)
    transpose = [int(i) for i in plans.get("transpose_forward", [0, 1, 2])]
    model_frame = transposed_frame(training_frame, transpose)
    spacing = [float(s) for s in config["spacing"]]
    patch = [int(p) for p in config["patch_size"]]
    if len(spacing) != 2:
        raise ModelPackageError(f"plans.json: configuration {config_name!r} spacing {spacing} is not 2D")

    if not folds:
        raise ModelPackageError("give at least one --fold")
    checkpoints = []
    for fold in folds:
        fold = str(fold)
        if fold != "all" and not fold.isdigit():
            raise ModelPackageError(f"--fold {fold!r}: a fold number or 'all' (nnU-Net's fold_all)")
        path = folder / f"fold_{fold}" / checkpoint_name
        if not path.parent.is_dir():
            have = sorted(p.name for p in folder.glob("fold_*"))
            raise ModelPackageError(f"{folder}: fold {fold} missing (no fold_{fold}/; found {have})")
        checkpoints.append((fold, path))

    num_classes = len(channel_labels)
    networks, checkpoint_info, mirroring_axes = [], [], set()
    trainer_names = set()
    for fold, path in checkpoints:
        log(f"reading {path}")
        checkpoint = load_checkpoint(path)
        init = checkpoint.get("init_args") or {}
        if isinstance(init, dict) and init.get("configuration") not in (None, config_name):
            raise ModelPackageError(f"{path}: trained for configuration {init.get('configuration')!r}, not {config_name!r}")
        trainer_names.add(str(checkpoint.get("trainer_name", "unknown")))
        axes = checkpoint.get("inference_allowed_mirroring_axes")
        mirroring_axes.add(None if axes is None else tuple(int(a) for a in axes))
        network = build_network(network_class_name=network_class, arch_kwargs=arch_kwargs, input_channels=1, num_classes=num_classes)
        load_weights(network, network_weights(checkpoint, path), path, num_classes=num_classes)
        networks.append(network.eval())
        checkpoint_info.append({"fold": fold, "path": str(path.relative_to(folder)), "sha256": sha256_of(path),
                                "epochs": int(checkpoint.get("current_epoch", 0) or 0)})
        del checkpoint

    if len(networks) == 1:
        card_class, card_kwargs, model = network_class, arch_kwargs, networks[0]
    else:
        card_class = ENSEMBLE_CLASS
        card_kwargs = {"n_folds": len(networks), "network_class_name": network_class, "arch_kwargs": arch_kwargs}
        model = build_network(network_class_name=card_class, arch_kwargs=card_kwargs, input_channels=1, num_classes=num_classes)
        for target, source in zip(model.folds, networks):
            target.load_state_dict(source.state_dict())
        model.eval()

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelPackageError(f"{out}: exists and is not empty (use --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "weights.safetensors"))
    log(f"exporting ONNX ({len(networks)} fold{'s' if len(networks) > 1 else ''}, tile {patch})")
    with torch.no_grad():
        export_onnx(model, out / "model.onnx", input_channels=1, tile_size=tuple(patch))

    dataset_name = plans.get("dataset_name", folder.parent.name)
    trainer = sorted(trainer_names)[0] if len(trainer_names) == 1 else "+".join(sorted(trainer_names))
    fold_text = "+".join(str(f) for f, _ in checkpoints)
    card = ModelCard(
        name=name or normalise_name(f"nnunet_{dataset_name}_{config_name}_fold_{fold_text}").replace("_", "-"),
        version=str(version),
        description=f"nnU-Net v2 {config_name} model {dataset_name} ({trainer}, plans {plans.get('plans_name', '?')}, "
                    f"fold{'s' if len(checkpoints) > 1 else ''} {', '.join(f for f, _ in checkpoints)}) imported by model.import_nnunet",
        channel_labels=channel_labels,
        frame=model_frame,
        pixel_spacing_mm=(spacing[1], spacing[0]),
        tile_size=(patch[0], patch[1]),
        normalization=norm,
        network_class_name=card_class,
        arch_kwargs=card_kwargs,
        input_channels=1,
        tile_step_size=0.5,
        gaussian_sigma_scale=0.125,
        mirroring=False,
        files={"weights": {"path": "weights.safetensors"}, "onnx": {"path": "model.onnx"}},
        provenance={
            "source": "nnU-Net v2 results folder",
            "results_folder": str(folder),
            "dataset_name": dataset_name,
            "trainer": trainer,
            "plans_name": plans.get("plans_name"),
            "configuration": config_name,
            "folds": [f for f, _ in checkpoints],
            "checkpoints": checkpoint_info,
            "plans_sha256": sha256_of(folder / "plans.json"),
            "dataset_json_sha256": sha256_of(folder / "dataset.json"),
            "training_frame": training_frame,
            "frame_source": frame_source,
            "transpose_forward": transpose,
            "image_reader_writer": plans.get("image_reader_writer"),
            "label_mapping": mapping,
            "ensemble": (
                "one network: the mean of the folds' logits, as nnUNetPredictor averages folds (it blends each fold's "
                "logits over tiles with the Gaussian and then averages the folds; the blending is linear, so averaging "
                "per tile first gives the same result)" if len(networks) > 1 else None
            ),
            "inference_allowed_mirroring_axes": [None if a is None else list(a) for a in sorted(mirroring_axes, key=str)],
            "mirroring": "off: a flip would swap left and right muscles (nnUNetPredictor mirrors when the checkpoint allows it "
                         "and use_mirroring is on; compare with use_mirroring=False)",
            "differences_from_nnunet": [
                "no crop to the nonzero bounding box (a CT has no zero-valued border unless padded with 0 HU; nnU-Net would "
                "label such a border background)",
                "logits are accumulated in float32 (nnUNetPredictor accumulates in float16)",
            ],
        },
    )
    path = write_model_card(card, out)
    from model.package import load_model_package

    load_model_package(out)  # the package as the container will read it
    log(f"wrote {path}: {num_classes - 1} muscles, frame {model_frame} ({frame_source}), spacing {card.pixel_spacing_mm} mm, tile {card.tile_size}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="nnU-Net results folder: <trainer>__<plans>__<configuration> (or its dataset folder)")
    parser.add_argument("--fold", nargs="+", required=True, help="fold number(s); several make an ensemble; 'all' is nnU-Net's fold_all")
    parser.add_argument("--out", type=Path, required=True, help="model package folder to write")
    parser.add_argument("--configuration", default=None, help="configuration name (default: from the folder name, else 2d)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"checkpoint file name in each fold (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--frame", default=None, help="axis frame of the training images (SimpleITK DICOMOrient code, e.g. LPS)")
    parser.add_argument("--training-image", type=Path, default=None, help="one training image; its axis frame is read")
    parser.add_argument("--label-map", type=Path, default=None, help="JSON {dataset label name: canonical name or value}")
    parser.add_argument("--name", default=None, help="model name for the card")
    parser.add_argument("--version", default="1", help="model version for the card")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        label_map = None
        if args.label_map is not None:
            label_map = _load_json(args.label_map)
            if not isinstance(label_map, dict):
                raise ModelPackageError(f"{args.label_map}: expected a JSON object")
        import_nnunet(
            args.results, folds=args.fold, out=args.out, configuration=args.configuration, frame=args.frame,
            training_image=args.training_image, label_map=label_map, checkpoint_name=args.checkpoint, name=args.name,
            version=args.version, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except TrunkSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
