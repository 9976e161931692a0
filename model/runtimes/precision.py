"""Which precision a runtime runs for a model, and why: the card's recorded agreement with fp32 and the CPU decide.

A reduced precision (bf16, int8, int8+bf16) changes the network's logits a little; whether that moves the
segmentation is a property of the weights, so it is measured per model (model/precision.py) and recorded in
the model card (`precision_agreement`, keyed by runner name such as "openvino-bf16"). `--precision auto`
(the default) takes the fastest mode of the chosen runtime that holds on the model in use, else fp32; an
explicit `--precision bf16|int8|int8+bf16` runs even where nothing was recorded, and the log and
results.json say so. On a GPU: fp16 unless fp32 is asked for (choose_gpu_precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common.errors import RuntimeUnavailableError
from model.package import ModelCard

PRECISIONS = ("auto", "fp32", "bf16", "int8", "int8+bf16")
#: per CPU runtime, its reduced-precision modes from fastest to slowest on a CPU with AMX (dev-2c, docs/benchmarks.md;
#: int8+bf16 was not measured there: it runs int8's graph with its float parts in bf16, so it is placed before int8)
SPEED_ORDER = {
    "openvino": ("bf16", "int8+bf16", "int8"),
    "onnxruntime": ("int8",),
    "torch-cpu": ("bf16",),
}
#: the same without AMX: with AVX512-BF16 and VNNI alone (dev-2c-amd, EPYC Zen 4) OpenVINO's int8 ran about 10 %
#: faster than its bf16 on both the demo and the paper-sized network, and int8+bf16 another 10-20 % faster on the
#: paper-sized one; without native bf16 only int8 is left anyway (mode_available)
SPEED_ORDER_WITHOUT_AMX = {**SPEED_ORDER, "openvino": ("int8+bf16", "int8", "bf16")}


@dataclass(frozen=True)
class PrecisionChoice:
    name: str
    reason: str
    verified: bool  # the card records that this mode agrees with fp32 on this model (always True for fp32)


def runner_key(runtime: str, precision: str) -> str:
    return f"{runtime}-{precision}"


def choose_precision(requested: str, *, runtime: str, card: ModelCard) -> PrecisionChoice:
    """The precision `runtime` runs for this model, and why (see the module docstring)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})")
    records = card.precision_agreement
    if requested != "auto":
        if requested == "fp32":
            return PrecisionChoice("fp32", "requested on the command line", True)
        record = records.get(runner_key(runtime, requested))
        if record and record.holds:
            return PrecisionChoice(requested, f"requested; agrees with fp32 on this model (min Dice {record.min_dice:.4f})", True)
        what = "does NOT agree with fp32 on this model" if record else "has no recorded agreement with fp32 for this model"
        return PrecisionChoice(requested, f"requested on the command line; {runner_key(runtime, requested)} {what}", False)
    for mode in speed_order(runtime):
        record = records.get(runner_key(runtime, mode))
        if record and record.holds and mode_available(runtime, mode, card):
            return PrecisionChoice(mode, f"fastest mode of {runtime} that agrees with fp32 on this model "
                                         f"(voxels {100 * record.voxel_agreement:.3f} %, min Dice {record.min_dice:.4f})", True)
    return PrecisionChoice("fp32", f"no faster mode of {runtime} is recorded as agreeing with fp32 on this model", True)


def mode_available(runtime: str, mode: str, card: ModelCard) -> bool:
    """Whether this machine and package can run `mode` natively (bf16 needs AMX or AVX512-BF16; int8 its ONNX file)."""
    if onnx_role(mode) not in card.files:
        return False
    return cpu_has_native_bf16() if uses_bf16(mode) else True


def speed_order(runtime: str) -> tuple[str, ...]:
    """`runtime`'s reduced-precision modes, fastest first on this CPU."""
    return (SPEED_ORDER if cpu_has_amx() else SPEED_ORDER_WITHOUT_AMX).get(runtime, ())


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split())


def cpu_has_native_bf16() -> bool:
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_has_amx() -> bool:
    return "amx_bf16" in _cpu_flags()


def onnx_role(precision: str) -> str:
    """The package file role of the ONNX graph a precision runs: the fp32 export, or the quantized one for int8 (and int8+bf16)."""
    return "onnx_int8" if precision.startswith("int8") else "onnx"


def uses_bf16(precision: str) -> bool:
    """Whether a precision needs native bf16 (bf16, and int8+bf16's float parts)."""
    return precision.endswith("bf16")


def choose_gpu_precision(requested: str, *, runtime: str) -> PrecisionChoice:
    """fp16 on the GPU unless fp32 is asked for: float16 with float32 normalisation layers (tests/test_tensorrt.py
    holds the fp16 engine to per-label Dice >= 0.99 against fp32 ONNX Runtime, on a GPU)."""
    if requested in ("auto", "fp16"):
        return PrecisionChoice("fp16", f"{runtime}: float16 with float32 normalisation layers (the GPU default)", True)
    if requested == "fp32":
        return PrecisionChoice("fp32", "requested on the command line", True)
    raise RuntimeUnavailableError(f"{runtime}: precision {requested!r} is not available on the GPU (choose auto, fp16 or fp32)")
