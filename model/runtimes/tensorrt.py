"""TensorRT engines for a model package: build them (or load them from the cache) and run them on torch's CUDA buffers.

Written against TensorRT's documented Python API (10.x and 11.x) and NOT run on the machines this
project was built on: they have no GPU and TensorRT cannot be installed there. What the CPU can check
is checked (tests/test_tensorrt_*.py: the cache key, the operator support of the ONNX graphs, the
float16 export's fidelity); the tests that need TensorRT are marked `gpu` and skip saying so.

Engine: one optimisation profile over the batch axis (tile shape fixed), a timing cache, and fp16:
- TensorRT 10 ("weak" typing): the package's float32 ONNX with BuilderFlag.FP16, the layers that
  normalisation parses to pinned to float32 by type (layer precision and output type,
  OBEY_PRECISION_CONSTRAINTS; see pin_norm_layers_to_float32);
- TensorRT 11 dropped every precision flag ("strong" typing only): the network is exported as float16
  ONNX with float32 normalisation layers (model/export_fp16.py) and built strongly typed. TensorRT 10
  can build that too (`typing="strong"`).
The serialised engine is cached on disk under a key of GPU name and compute capability, TensorRT
version, the package ONNX's SHA-256 (plus, for the strong build, the weights' SHA-256 and the
float16 exporter's version), precision, typing, tile and batch range. Engines are looked up in the
package's `engines/` folder (written ahead of time by `python -m model.build_engine PKG`), then in
the cache folder; when none fits, the runtime builds one on first use and says so.

Running: device buffers are torch CUDA tensors; input and output tensors are bound by name after
their shape and dtype are checked against the engine; `execute_async_v3` runs on torch's current
stream and its return value is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from model.package import INPUT_NAME, OUTPUT_NAME, ModelPackage, sha256_of
from model.runtimes.contract import check_batch, check_logits
from model.runtimes.gpu import import_tensorrt
from common.atomic import atomic_path, write_bytes_atomically
from common.errors import ModelPackageError, RuntimeUnavailableError

ENGINE_FORMAT = 1
DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH = 1, 16, 32
DEFAULT_WORKSPACE_BYTES = 4 * 1024**3
PRECISIONS = ("fp16", "fp32")
TYPINGS = ("weak", "strong")
ENGINE_FOLDER = "engines"
#: TensorRT layer types kept in float32 in the weak fp16 build: what normalisation layers parse to
FLOAT32_LAYER_TYPES = ("NORMALIZATION", "REDUCE", "ELEMENTWISE", "UNARY", "SCALE")
#: a plugin layer whose name has this path component is a normalisation module's (InstanceNorm as a plugin)
NORM_LAYER_NAME = re.compile(r"(^|[/.])(norm|InstanceNormalization)([/._]|$)")

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- cache key -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuIdentity:
    """What an engine is tied to: the GPU model and its compute capability, and the TensorRT version."""

    name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str

    @property
    def tensorrt_major(self) -> int:
        return int(self.tensorrt_version.split(".")[0])


@dataclass(frozen=True)
class EngineKey:
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    onnx_sha256: str  # the package's model.onnx (the card's checksum)
    weights_sha256: str  # the package's weights ("" unless the strong build exports them as float16 ONNX)
    fp16_export_version: int  # model.export_fp16.FP16_EXPORT_VERSION for the strong build, else 0
    precision: str
    typing: str
    input_channels: int
    tile_size: tuple[int, int]
    batch_range: tuple[int, int, int]  # min, opt, max of the one optimisation profile
    engine_format: int = ENGINE_FORMAT

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def file_stem(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        return f"{gpu}-sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt_version}-{self.precision}-{self.typing}-{self.digest}"

    def to_json(self) -> dict:
        data = asdict(self)
        data["tile_size"], data["batch_range"] = list(self.tile_size), list(self.batch_range)
        return data


def default_typing(tensorrt_version: str) -> str:
    """TensorRT 10: the fp16 builder flag on the float32 ONNX; TensorRT 11 and later: strongly typed only."""
    return "weak" if int(tensorrt_version.split(".")[0]) <= 10 else "strong"


def engine_key(package: ModelPackage, gpu: GpuIdentity, *, precision: str = "fp16", typing: str | None = None,
               batch_range: tuple[int, int, int] = (DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH)) -> EngineKey:
    """The cache key of the engine for this package on this GPU and TensorRT (no GPU or TensorRT needed)."""
    if precision not in PRECISIONS:
        raise RuntimeUnavailableError(f"tensorrt: precision {precision!r} is not available (choose from {', '.join(PRECISIONS)})")
    typing = typing or default_typing(gpu.tensorrt_version)
    if typing not in TYPINGS:
        raise ValueError(f"unknown typing {typing!r} (choose from {', '.join(TYPINGS)})")
    if typing == "weak" and gpu.tensorrt_major >= 11:
        raise RuntimeUnavailableError(f"tensorrt {gpu.tensorrt_version} builds strongly typed networks only (no fp16 builder flag)")
    if precision == "fp32":
        typing = "weak" if gpu.tensorrt_major <= 10 else "strong"  # a float32 graph: the same engine either way
    low, opt, high = batch_range
    if not 1 <= low <= opt <= high:
        raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max, got {batch_range}")
    card = package.card
    fp16_graph = precision == "fp16" and typing == "strong"
    if fp16_graph:
        from model.export_fp16 import FP16_EXPORT_VERSION
    return EngineKey(
        gpu_name=gpu.name, compute_capability=gpu.compute_capability, tensorrt_version=gpu.tensorrt_version,
        onnx_sha256=_card_sha(package, "onnx"), weights_sha256=_card_sha(package, "weights") if fp16_graph else "",
        fp16_export_version=FP16_EXPORT_VERSION if fp16_graph else 0, precision=precision, typing=typing,
        input_channels=card.input_channels, tile_size=tuple(card.tile_size), batch_range=(low, opt, high),
    )


def _card_sha(package: ModelPackage, role: str) -> str:
    entry = package.card.files.get(role)
    if not entry or not entry.sha256:
        raise ModelPackageError(f"{package.folder}: the model card lists no checksum for its {role!r} file")
    return entry.sha256


def default_cache_dir() -> Path:
    """$TRUNKSEG_ENGINE_CACHE, else $XDG_CACHE_HOME/trunkseg/engines, else ~/.cache/trunkseg/engines (else /tmp when home is read-only)."""
    if os.environ.get("TRUNKSEG_ENGINE_CACHE"):
        return Path(os.environ["TRUNKSEG_ENGINE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidate = base / "trunkseg" / "engines"
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    return Path("/tmp") / "trunkseg-engines"  # the platform's containers have a read-only root but a writable /tmp


def engine_folders(package: ModelPackage, cache_dir: Path) -> list[Path]:
    """Where engines are looked for, first match wins: the package's engines/ (ahead of time), then the cache."""
    return [package.folder / ENGINE_FOLDER, Path(cache_dir)]


def find_engine(key: EngineKey, folders: list[Path], *, log: Log | None = None) -> Path | None:
    """The first `<stem>.plan` whose sidecar `<stem>.json` records exactly `key` and the plan's SHA-256.

    A plan that does not match its recorded checksum (truncated copy, disk error) is skipped, saying so.
    """
    for folder in folders:
        plan = folder / f"{key.file_stem}.plan"
        sidecar = plan.with_suffix(".json")
        if plan.is_file() and sidecar.is_file():
            try:
                recorded = json.loads(sidecar.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if recorded.get("key") != key.to_json():
                continue
            if recorded.get("plan_sha256") != sha256_of(plan):
                if log is not None:
                    log(f"tensorrt: {plan} does not match the checksum in {sidecar.name}: not used")
                continue
            return plan
    return None


def write_engine(key: EngineKey, plan_bytes: bytes, folder: Path, *, build_info: dict) -> Path:
    """Write `<stem>.plan` and its sidecar atomically (temporary files, then rename: a crash leaves no half engine)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"{key.file_stem}.plan"
    sidecar = plan.with_suffix(".json")
    record = {"key": key.to_json(), "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(), **build_info}
    for path, data in ((plan, plan_bytes), (sidecar, (json.dumps(record, indent=2) + "\n").encode())):
        write_bytes_atomically(path, data)
    return plan


def timing_cache_path(gpu: GpuIdentity, cache_dir: Path) -> Path:
    name = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-")
    return Path(cache_dir) / f"timing-{name}-sm{gpu.compute_capability.replace('.', '')}-trt{gpu.tensorrt_version}.cache"


# --- operator support (checked on the CPU) --------------------------------------------------------------

#: ONNX operators TensorRT's ONNX parser supports, with the float types it takes, for the layers nnU-Net-style
#: networks export to (from onnx-tensorrt's docs/operators.md, TensorRT 8.5+, opset <= 17; later versions add,
#: never remove). A graph with any other operator is refused here rather than trusted to the parser.
TENSORRT_OPERATORS: dict[str, frozenset[str]] = {
    **{op: frozenset({"FLOAT", "FLOAT16"}) for op in (
        "Conv", "ConvTranspose", "InstanceNormalization", "BatchNormalization", "LeakyRelu", "Relu", "PRelu", "Elu",
        "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Sqrt", "Reciprocal", "Pow", "Erf", "Exp", "Log", "Clip",
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "MaxPool", "AveragePool", "GlobalAveragePool",
        "MatMul", "Gemm", "Resize", "Upsample", "Dropout",
    )},
    **{op: frozenset({"FLOAT", "FLOAT16", "INT32", "INT64"}) for op in (
        "Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs",
    )},
    **{op: frozenset({"FLOAT", "FLOAT16", "INT32", "INT64", "INT8", "BOOL"}) for op in (
        "Cast", "Concat", "Constant", "Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice",
        "Shape", "Gather", "Expand", "Pad", "Split", "Where", "Tile", "ConstantOfShape",
    )},
}
#: operators whose weight input must be an initializer for TensorRT's parser (input index -> what)
TENSORRT_INITIALIZER_INPUTS = {"Conv": {1: "weights"}, "ConvTranspose": {1: "weights"}, "InstanceNormalization": {1: "scale", 2: "bias"}}
TENSORRT_MAX_OPSET = 17


def check_tensorrt_operators(onnx_path: Path) -> list[str]:
    """Problems (empty when none) found by checking this graph against TENSORRT_OPERATORS, our table of what
    onnx-tensorrt documents as supported (operators, types, opset, constant weights); TensorRT's parser itself is not run."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    problems = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > TENSORRT_MAX_OPSET:
        problems.append(f"opset {opset} is above {TENSORRT_MAX_OPSET}, the highest this table was checked for")
    types = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
             for v in (*graph.input, *graph.output, *graph.value_info) if v.type.HasField("tensor_type")}
    types.update({i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in graph.initializer})
    initializers = {i.name for i in graph.initializer}
    constants = {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    for node in graph.node:
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: custom domain {node.domain!r} needs a plugin")
            continue
        allowed = TENSORRT_OPERATORS.get(node.op_type)
        if allowed is None:
            problems.append(f"{label}: operator not in the supported table")
            continue
        for name in (*node.input, *node.output):
            if name and types.get(name, "UNDEFINED") not in allowed | {"UNDEFINED"}:
                problems.append(f"{label}: tensor {name!r} is {types[name]}, supported: {', '.join(sorted(allowed))}")
        for index, what in TENSORRT_INITIALIZER_INPUTS.get(node.op_type, {}).items():
            if index < len(node.input) and node.input[index] and node.input[index] not in initializers | constants:
                problems.append(f"{label}: {what} must be an initializer")
    return problems


# --- building --------------------------------------------------------------------------------------------

def gpu_identity(device_index: int = 0) -> GpuIdentity:
    trt = import_tensorrt()
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return GpuIdentity(torch.cuda.get_device_name(device_index), f"{major}.{minor}", trt.__version__)


_LOGGER = []


def _logger():
    """One TensorRT logger for the process: it must outlive every builder, runtime and engine made with it."""
    if not _LOGGER:
        trt = import_tensorrt()
        _LOGGER.append(trt.Logger(trt.Logger.WARNING))
    return _LOGGER[0]


def onnx_for_build(package: ModelPackage, key: EngineKey, cache_dir: Path, *, log: Log = _stderr) -> Path:
    """The ONNX graph the engine is built from: the package's, or (strong fp16) its float16 export, made once and cached."""
    if not (key.precision == "fp16" and key.typing == "strong"):
        return package.path_of("onnx")
    path = Path(cache_dir) / f"fp16-{key.weights_sha256[:16]}-v{key.fp16_export_version}.onnx"
    if path.is_file():
        return path
    import torch

    from model.export_fp16 import export_onnx_fp16
    from model.network import load_package_network

    card = package.card
    network = load_package_network(package)
    log(f"tensorrt: exporting the float16 ONNX (float32 normalisation layers) for a strongly typed build -> {path}")
    with atomic_path(path) as temp, torch.no_grad():
        export_onnx_fp16(network, temp, input_channels=card.input_channels, tile_size=tuple(card.tile_size))
    return path


def pin_norm_layers_to_float32(network) -> int:
    """Weak fp16 build: keep normalisation in float32. Returns how many layers were pinned.

    Chosen by layer type, not by name: an InstanceNormalization node parses to a NORMALIZATION layer
    (or a plugin named after its module), and model.export's two-pass InstanceNorm to REDUCE,
    ELEMENTWISE and UNARY layers whose ONNX names follow the traced module path (e.g.
    `.../all_modules.1/ReduceMean`, not `.../norm/...`). So every layer of those types runs in float32
    (in nnU-Net's networks that is the normalisation, plus residual additions where there are any),
    and convolutions, deconvolutions, activations and concatenations run in float16.
    """
    trt = import_tensorrt()

    float_types = (trt.float32, trt.float16)
    pinned_types = {getattr(trt.LayerType, name) for name in FLOAT32_LAYER_TYPES if hasattr(trt.LayerType, name)}
    plugin_types = {getattr(trt.LayerType, name) for name in ("PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, name)}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        named_norm = layer.type in plugin_types and NORM_LAYER_NAME.search(layer.name or "")
        if layer.type in pinned_types or named_norm:
            if all(layer.get_output(i).dtype in float_types for i in range(layer.num_outputs)):
                layer.precision = trt.float32
                for i in range(layer.num_outputs):
                    layer.set_output_type(i, trt.float32)
                pinned += 1
    return pinned


def build_serialized_engine(onnx_path: Path, key: EngineKey, *, timing_cache: Path | None, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                            log: Log = _stderr) -> bytes:
    """Parse the ONNX and build the serialised engine `key` describes (one profile over the batch axis)."""
    trt = import_tensorrt()

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if key.typing == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeUnavailableError(f"{onnx_path}: TensorRT's ONNX parser refused the graph ({errors[:400]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if key.precision == "fp16" and key.typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log(f"tensorrt: fp16 builder flag; {pin_norm_layers_to_float32(network)} normalisation (reduce/elementwise/unary) layers kept in float32")
    profile = builder.create_optimization_profile()
    shape = lambda batch: (batch, key.input_channels, *key.tile_size)  # noqa: E731
    profile.set_shape(INPUT_NAME, shape(key.batch_range[0]), shape(key.batch_range[1]), shape(key.batch_range[2]))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"tensorrt: timing cache {timing_cache} does not fit this GPU/TensorRT; starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeUnavailableError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    if timing_cache is not None:
        write_bytes_atomically(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def ensure_engine(package: ModelPackage, key: EngineKey, *, cache_dir: Path, out_dir: Path | None = None, log: Log = _stderr,
                  rebuild: bool = False) -> Path:
    """The engine file for `key`: found in the package or the cache, else built now (written to `out_dir`, default the cache)."""
    if not rebuild:
        found = find_engine(key, engine_folders(package, cache_dir) if out_dir is None else [Path(out_dir)], log=log)
        if found is not None:
            return found
    target = Path(out_dir) if out_dir is not None else Path(cache_dir)
    log(f"tensorrt: no engine for {key.gpu_name} (sm {key.compute_capability}), TensorRT {key.tensorrt_version}, "
        f"{key.precision} ({key.typing} typing) of this model: building one (once; minutes) -> {target}")
    started = time.perf_counter()
    onnx_path = onnx_for_build(package, key, Path(cache_dir), log=log)
    plan = build_serialized_engine(onnx_path, key, timing_cache=timing_cache_path(GpuIdentity(key.gpu_name, key.compute_capability, key.tensorrt_version), Path(cache_dir)), log=log)
    seconds = time.perf_counter() - started
    path = write_engine(key, plan, target, build_info={"built_from": str(onnx_path), "built_from_sha256": sha256_of(onnx_path),
                                                      "build_seconds": round(seconds, 1), "model": package.card.identity})
    log(f"tensorrt: engine built in {seconds:.0f} s ({len(plan) / 2**20:.1f} MiB) -> {path}")
    return path


# --- running ---------------------------------------------------------------------------------------------

class TensorRTRunner:
    """A TensorRT engine as a runtime: `run_device(tensor) -> tensor` on CUDA, and the numpy `__call__` of every runtime."""


    def __init__(self, package: ModelPackage, *, precision: str = "fp16", typing: str | None = None, cache_dir: Path | None = None,
                 batch_range: tuple[int, int, int] = (DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH), device: str = "cuda",
                 log: Log = _stderr):
        if precision == "auto":
            precision = "fp16"
        if precision not in PRECISIONS:
            raise RuntimeUnavailableError(f"tensorrt: precision {precision!r} is not available (choose from {', '.join(PRECISIONS)})")
        self.package = package
        self.precision = precision
        self.typing = typing
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_range = batch_range
        self.device = device
        self.log = log
        self.name = f"tensorrt-{precision}"
        self.preferred_batch_size = batch_range[1]
        self.engine = self.context = None

    def __enter__(self) -> "TensorRTRunner":
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("tensorrt: no CUDA GPU visible to torch")
        self.torch = torch
        self.device = torch.device(self.device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        torch.zeros(1, device=self.device)  # creates torch's CUDA context first: TensorRT then shares it
        gpu = gpu_identity(index)
        key = engine_key(self.package, gpu, precision=self.precision, typing=self.typing, batch_range=self.batch_range)
        self.key = key
        cache_dir = self.cache_dir or default_cache_dir()
        messages: list[str] = []
        path = ensure_engine(self.package, key, cache_dir=cache_dir, log=lambda m: (messages.append(m), self.log(m)))
        self._built_now = any("building one" in m for m in messages)
        self.engine_path = path
        self._runtime = trt.Runtime(_logger())
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None and not self._built_now:
            # a cached engine this TensorRT/driver no longer loads: build afresh once, into the cache
            self.log(f"tensorrt: {path} does not deserialise here; rebuilding it")
            path = self.engine_path = ensure_engine(self.package, key, cache_dir=cache_dir, log=self.log, rebuild=True)
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeUnavailableError(f"{path}: TensorRT cannot deserialise this engine (built by another version or for another GPU?)")
        self._check_io(trt)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeUnavailableError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        self.name = f"tensorrt-{self.precision}"
        self.log(f"tensorrt: engine {path} ({gpu.name}, TensorRT {gpu.tensorrt_version}, {key.precision}, {key.typing} typing, "
                 f"batch {self.batch_limits[0]}-{self.batch_limits[1]})")
        return self

    def _check_io(self, trt) -> None:
        engine, card = self.engine, self.package.card
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {name: engine.get_tensor_mode(name) for name in names}
        if modes.get(INPUT_NAME) != trt.TensorIOMode.INPUT or modes.get(OUTPUT_NAME) != trt.TensorIOMode.OUTPUT or len(names) != 2:
            raise RuntimeUnavailableError(f"{self.engine_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found {names}")
        if engine.get_tensor_dtype(INPUT_NAME) != trt.float32:
            raise RuntimeUnavailableError(f"{self.engine_path}: input {INPUT_NAME!r} is {engine.get_tensor_dtype(INPUT_NAME)}, expected float32")
        out_dtype = engine.get_tensor_dtype(OUTPUT_NAME)
        if out_dtype not in (trt.float32, trt.float16):
            raise RuntimeUnavailableError(f"{self.engine_path}: output {OUTPUT_NAME!r} is {out_dtype}, expected float32 or float16")
        self.output_dtype = self.torch.float32 if out_dtype == trt.float32 else self.torch.float16
        in_shape, out_shape = tuple(engine.get_tensor_shape(INPUT_NAME)), tuple(engine.get_tensor_shape(OUTPUT_NAME))
        if in_shape[1:] != (card.input_channels, *card.tile_size) or out_shape[1:] != (card.num_classes, *card.tile_size):
            raise RuntimeUnavailableError(f"{self.engine_path}: engine shapes {in_shape} -> {out_shape} do not fit the card")
        low, _, high = (tuple(s) for s in engine.get_tensor_profile_shape(INPUT_NAME, 0))
        self.batch_limits = (low[0], high[0])

    def __exit__(self, *exc) -> None:
        self.context = None
        self.engine = None

    def run_device(self, batch):
        """Logits of a (B, channels, tile_y, tile_x) float32 CUDA tensor, on torch's current stream (asynchronous)."""
        torch, card = self.torch, self.package.card
        if batch.device.type != "cuda" or batch.dtype != torch.float32:
            raise TypeError(f"{self.name}: input {INPUT_NAME!r} must be a float32 CUDA tensor, got {batch.dtype} on {batch.device}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (card.input_channels, *card.tile_size):
            raise ValueError(f"{self.name}: input {INPUT_NAME!r} must be (batch, {card.input_channels}, {card.tile_size[0]}, {card.tile_size[1]}), got {tuple(batch.shape)}")
        low, high = self.batch_limits
        if batch.shape[0] > high:
            return torch.cat([self.run_device(part) for part in torch.split(batch, high)])
        if batch.shape[0] < low:
            raise ValueError(f"{self.name}: batch of {batch.shape[0]} is below the engine's minimum {low}")
        batch = batch.contiguous()
        if not self.context.set_input_shape(INPUT_NAME, tuple(batch.shape)):
            raise RuntimeError(f"{self.name}: TensorRT refused input shape {tuple(batch.shape)}")
        expected = (batch.shape[0], card.num_classes, *card.tile_size)
        if tuple(self.context.get_tensor_shape(OUTPUT_NAME)) != expected:
            raise RuntimeError(f"{self.name}: output {OUTPUT_NAME!r} would be {tuple(self.context.get_tensor_shape(OUTPUT_NAME))}, expected {expected}")
        out = torch.empty(expected, dtype=self.output_dtype, device=batch.device)
        self.context.set_tensor_address(INPUT_NAME, batch.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(batch.device).cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see TensorRT's log above)")
        return out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        card = self.package.card
        check_batch(batch, card.input_channels, card.tile_size, self.name)
        logits = self.run_device(self.torch.from_numpy(batch).to(self.device))
        return check_logits(logits.float().cpu().numpy(), batch, card.num_classes, self.name)
