"""Build a model package's TensorRT engine ahead of time, for the GPU and TensorRT of this machine.

    python -m model.build_engine PKG                 # -> PKG/engines/<gpu>-sm<cc>-trt<version>-fp16-<typing>-<key>.plan
    python -m model.build_engine PKG --out DIR       # anywhere else (e.g. $TRUNKSEG_ENGINE_CACHE)
    python -m model.build_engine PKG --check-only    # no GPU needed: are its operators in our table of what TensorRT supports?

The runtime finds an engine in PKG/engines/ or in its cache folder when the key matches (GPU name and
compute capability, TensorRT version, the package's ONNX checksum, precision, typing, tile and batch
range); otherwise it builds one on first use. Building ahead of time saves that minute or two in the
first job. An engine only runs on the GPU model and TensorRT version it was built with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from model.package import load_model_package
from model.runtimes.tensorrt import (
    DEFAULT_MAX_BATCH, DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, ENGINE_FOLDER, PRECISIONS, TYPINGS, check_tensorrt_operators,
    default_cache_dir, engine_key, ensure_engine, gpu_identity,
)
from model.runtimes.gpu import tensorrt_installed
from common.errors import RuntimeUnavailableError, TrunkSegError


def check_graphs(package, *, precision: str, log) -> int:
    """Operator check of the package ONNX and (fp16) of its float16 export against TENSORRT_OPERATORS, our table of
    onnx-tensorrt's documented operators (not TensorRT's parser: that needs TensorRT); 0 when both pass."""
    graphs = [package.path_of("onnx")]
    with tempfile.TemporaryDirectory(prefix="trunkseg-fp16-") as work:
        if precision == "fp16":
            import torch
            from model.export_fp16 import export_onnx_fp16
            from model.network import load_package_network

            card = package.card
            network = load_package_network(package)
            with torch.no_grad():
                graphs.append(export_onnx_fp16(network, Path(work) / "fp16.onnx", input_channels=card.input_channels, tile_size=tuple(card.tile_size)))
        failures = 0
        for graph in graphs:
            problems = check_tensorrt_operators(graph)
            log(f"{graph.name}: " + ("every operator and type is in our table of onnx-tensorrt's documented operators (the parser itself did not run)" if not problems else f"{len(problems)} problem(s)"))
            for problem in problems:
                log(f"  {problem}")
            failures += bool(problems)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default PKG/{ENGINE_FOLDER})")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--typing", choices=TYPINGS, default=None, help="weak: fp16 builder flag (TensorRT 10); strong: float16 ONNX (default on TensorRT 11)")
    parser.add_argument("--batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), default=(DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH))
    parser.add_argument("--rebuild", action="store_true", help="build even when a matching engine exists")
    parser.add_argument("--check-only", action="store_true", help="only check the graphs' operators against our table of onnx-tensorrt's documented operators (no GPU or TensorRT needed; not the parser itself)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        package = load_model_package(args.package)
        if args.check_only:
            return check_graphs(package, precision=args.precision, log=log)
        if not tensorrt_installed():
            raise RuntimeUnavailableError("tensorrt is not installed (tensorrt-cu13-libs and -bindings from NVIDIA's index: see docker/requirements-gpu.txt)")
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("no CUDA GPU visible: an engine is built on (and for) the GPU it will run on")
        key = engine_key(package, gpu_identity(torch.cuda.current_device()), precision=args.precision, typing=args.typing, batch_range=tuple(args.batch))
        out = args.out or package.folder / ENGINE_FOLDER
        path = ensure_engine(package, key, cache_dir=default_cache_dir(), out_dir=out, log=log, rebuild=args.rebuild)
        print(path)
        return 0
    except TrunkSegError as error:
        log(f"error: {error}")
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
