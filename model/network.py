"""nnU-Net's 2D U-Net, built from dynamic_network_architectures with the arguments nnU-Net's plans carry.

Only torch-side tools (training, export, the torch runtime, the nnU-Net importer) import this module;
the CPU container runs the ONNX export and has no torch.

Class and layer names in a plans file are strings (`_kw_requires_import`); they are resolved through an
explicit allow-list here, never by importing whatever a file names.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from model.package import NNUNET_LAYERS, ModelPackage
from common.errors import ModelPackageError

NETWORK_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": PlainConvUNet,
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": ResidualEncoderUNet,
}
_IMPORTABLE = {
    "torch.nn.modules.conv.Conv2d": torch.nn.Conv2d,
    "torch.nn.Conv2d": torch.nn.Conv2d,
    "torch.nn.modules.instancenorm.InstanceNorm2d": torch.nn.InstanceNorm2d,
    "torch.nn.InstanceNorm2d": torch.nn.InstanceNorm2d,
    "torch.nn.modules.batchnorm.BatchNorm2d": torch.nn.BatchNorm2d,
    "torch.nn.BatchNorm2d": torch.nn.BatchNorm2d,
    "torch.nn.modules.dropout.Dropout2d": torch.nn.Dropout2d,
    "torch.nn.Dropout2d": torch.nn.Dropout2d,
    "torch.nn.LeakyReLU": torch.nn.LeakyReLU,
    "torch.nn.modules.activation.LeakyReLU": torch.nn.LeakyReLU,
    "torch.nn.ReLU": torch.nn.ReLU,
    "torch.nn.modules.activation.ReLU": torch.nn.ReLU,
}
_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
#: several folds of one architecture (an imported nnU-Net ensemble): arch_kwargs {n_folds, network_class_name, arch_kwargs}
ENSEMBLE_CLASS = "model.network.FoldEnsemble"


class FoldEnsemble(torch.nn.Module):
    """Folds of one architecture; the output is the mean of their logits, as nnUNetPredictor averages folds."""

    def __init__(self, networks: list[torch.nn.Module]):
        super().__init__()
        self.folds = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.folds[0](x)
        for network in self.folds[1:]:
            out = out + network(x)
        return out / len(self.folds)


def plain_unet_kwargs(*, features_per_stage: list[int], strides: list[int], n_conv_per_stage: int = 2) -> dict:
    """nnU-Net-style `arch_kwargs` for a 2D PlainConvUNet (3x3 kernels, InstanceNorm, LeakyReLU)."""
    n_stages = len(features_per_stage)
    return {
        "n_stages": n_stages,
        "features_per_stage": list(features_per_stage),
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * n_stages,
        "strides": [[s, s] for s in strides],
        "n_conv_per_stage": [n_conv_per_stage] * n_stages,
        "n_conv_per_stage_decoder": [n_conv_per_stage] * (n_stages - 1),
        **NNUNET_LAYERS,
    }


def build_network(
    *, network_class_name: str, arch_kwargs: Mapping[str, Any], input_channels: int, num_classes: int
) -> torch.nn.Module:
    """Instantiate the network a model card (or nnU-Net plans) describes, without deep supervision."""
    if network_class_name == ENSEMBLE_CLASS:
        inner = arch_kwargs.get("network_class_name")
        n_folds = arch_kwargs.get("n_folds")
        if inner == ENSEMBLE_CLASS or not isinstance(n_folds, int) or n_folds < 1:
            raise ModelPackageError(f"invalid fold ensemble arguments (n_folds {n_folds!r}, network {inner!r})")
        return FoldEnsemble([
            build_network(network_class_name=inner, arch_kwargs=arch_kwargs.get("arch_kwargs", {}),
                          input_channels=input_channels, num_classes=num_classes)
            for _ in range(n_folds)
        ])
    network_class = NETWORK_CLASSES.get(network_class_name)
    if network_class is None:
        raise ModelPackageError(f"unknown network class {network_class_name!r} (known: {', '.join(NETWORK_CLASSES)})")
    kwargs = dict(arch_kwargs)
    for key in _REQUIRES_IMPORT:
        name = kwargs.get(key)
        if name is None:
            continue
        if name not in _IMPORTABLE:
            raise ModelPackageError(f"architecture argument {key}={name!r} is not an allowed layer type")
        kwargs[key] = _IMPORTABLE[name]
    kwargs.pop("_kw_requires_import", None)
    return network_class(input_channels=input_channels, num_classes=num_classes, deep_supervision=False, **kwargs)


def load_package_network(package: ModelPackage) -> torch.nn.Module:
    """The network a package's card describes, with the package's safetensors weights (never a pickle), in eval mode.

    A weights file that does not load, or does not fit the architecture key for key, is a ModelPackageError.
    """
    card = package.card
    network = build_network(network_class_name=card.network_class_name, arch_kwargs=card.arch_kwargs,
                            input_channels=card.input_channels, num_classes=card.num_classes)
    from safetensors.torch import load_model

    path = package.path_of("weights")
    try:
        missing, unexpected = load_model(network, str(path), strict=False)
    except Exception as error:  # safetensors raises several types for corrupt files
        raise ModelPackageError(f"{path}: cannot load weights ({str(error)[:200]})") from None
    if missing or unexpected:
        raise ModelPackageError(f"{path}: weights do not fit the architecture (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return network.eval()
