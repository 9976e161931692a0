"""What the GPU tests need to know about this machine, and the reasons they give when they skip."""

from __future__ import annotations

import importlib.util
import os


def has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    import torch

    return bool(torch.cuda.is_available())


def has_tensorrt() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt", "tensorrt_bindings"))


NO_CUDA_REASON = "needs a CUDA GPU and a CUDA build of torch (none here: the development and CI machines have no GPU)"
NO_TENSORRT_REASON = "needs TensorRT and a CUDA GPU (TensorRT cannot be installed on the development and CI machines)"
