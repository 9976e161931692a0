"""The paper-sized network as a model package, for the benchmarks: nnU-Net's default 2d plan for 512x512 CT.

PlainConvUNet, 8 stages, features 32-512, 46 M parameters, one 512x512 tile per slice at the CT's own
spacing, seeded random weights (a random network's near-ties make its agreement a stress test, not a
property of a trained model), and its ONNX export. `features_per_stage` and `tile_size` make a smaller
network of the same family (benchmarks/gpu_session.py --rehearse). No SimpleITK here: the GPU session
imports this on a machine without it.
"""

from __future__ import annotations

from pathlib import Path

PAPER_FEATURES = (32, 64, 128, 256, 512, 512, 512, 512)
PAPER_TILE_YX = (512, 512)


def paper_package(folder: Path, *, spacing_mm: float, seed: int = 0, features_per_stage=PAPER_FEATURES,
                  tile_size: tuple[int, int] = PAPER_TILE_YX) -> Path:
    """A package of nnU-Net's default 2d network for 512x512 CT (seeded random weights), with its ONNX export."""
    import torch
    from safetensors.torch import save_model

    from model.export import export_onnx
    from model.network import build_network, plain_unet_kwargs
    from model.package import ModelCard, Normalization, write_model_card

    folder.mkdir(parents=True, exist_ok=True)
    arch = plain_unet_kwargs(features_per_stage=list(features_per_stage), strides=[1] + [2] * (len(features_per_stage) - 1))
    torch.manual_seed(seed)
    name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    network = build_network(network_class_name=name, arch_kwargs=arch, input_channels=1, num_classes=23).eval()
    with torch.no_grad():  # nnU-Net's init leaves every InstanceNorm at identity: perturb so that classes differ
        for parameter in network.parameters():
            parameter += 0.1 * torch.randn_like(parameter)
    save_model(network, str(folder / "weights.safetensors"))
    export_onnx(network, folder / "model.onnx", input_channels=1, tile_size=tuple(tile_size))
    paper = tuple(features_per_stage) == PAPER_FEATURES and tuple(tile_size) == PAPER_TILE_YX
    card = ModelCard(
        name="bench-paper-size-random" if paper else "bench-paper-family-small-random", version="0",
        description=("nnU-Net default 2d plan for 512x512 CT, random weights (benchmark only)" if paper else
                     f"the paper network's family at features {list(features_per_stage)}, {tile_size[0]}x{tile_size[1]} tiles, "
                     "random weights (rehearsal only)"),
        channel_labels=tuple(range(23)), frame="LPS", pixel_spacing_mm=(spacing_mm, spacing_mm), tile_size=tuple(tile_size),
        normalization=Normalization("CT", clip_low=-180.0, clip_high=250.0, mean=30.0, std=70.0),
        network_class_name=name, arch_kwargs=arch,
        files={"weights": {"path": "weights.safetensors"}, "onnx": {"path": "model.onnx"}},
        provenance={"parameters": int(sum(p.numel() for p in network.parameters()))},
    )
    write_model_card(card, folder)
    return folder
