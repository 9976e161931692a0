"""Build-time smoke check, run inside an image's builder stage: fail the build early, with one clear line.

    python check_image.py algorithm --flavour cpu|gpu   # in /opt/app: bundled model loads and runs one batch
    python check_image.py evaluation                    # in /opt/app: the evaluation entry point imports

The algorithm check loads the bundled model package (its checksums), opens the flavour's runtime
(cpu: ONNX Runtime, and no torch anywhere; gpu: torch, which must import) and runs one zero batch
through it, so that a missing shared library shows at build time, not in the first job.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys


def fail(message: str) -> None:
    print(f"check_image: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_algorithm(flavour: str) -> None:
    import numpy as np

    import process
    from model.package import load_model_package
    from model.runtimes.choice import RuntimeChoice, open_runtime

    package = load_model_package(process.BUNDLED_MODEL)
    card = package.card
    has_torch = importlib.util.find_spec("torch") is not None
    if flavour == "cpu":
        if has_torch:
            fail("the cpu flavour must not contain torch")
        choice = RuntimeChoice("onnxruntime", "build-time check")
    else:
        if not has_torch:
            fail("the gpu flavour needs torch")
        choice = RuntimeChoice("torch-cpu", "build-time check (no GPU while building)")
    batch = np.zeros((1, card.input_channels, *card.tile_size), dtype=np.float32)
    with open_runtime(choice, package, threads=1) as runtime:
        logits = runtime(batch)
    if "torch" in sys.modules and flavour == "cpu":
        fail("the cpu flavour imported torch")
    print(f"check_image: bundled model {card.identity} runs on {choice.name}: {batch.shape} -> {logits.shape}")


def check_evaluation() -> None:
    """Run the real entry point (`python -m evaluation --help`) in this process, then look at what it imported."""
    import contextlib
    import io
    import runpy

    argv, sys.argv = sys.argv, ["evaluation", "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module("evaluation", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
    if code not in (0, None):
        fail(f"`python -m evaluation --help` exited {code}")
    for name in ("torch", "onnxruntime"):
        if name in sys.modules:
            fail(f"the evaluation image must not import {name}")
    print("check_image: `python -m evaluation --help` runs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", choices=("algorithm", "evaluation"))
    parser.add_argument("--flavour", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args()
    sys.path.insert(0, ".")
    if args.image == "algorithm":
        check_algorithm(args.flavour)
    else:
        check_evaluation()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
