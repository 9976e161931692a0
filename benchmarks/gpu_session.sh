#!/usr/bin/env bash
# Everything the GPU path needs checked on a machine with a CUDA GPU, in one short run (about 5-10 minutes,
# most of it the TensorRT engine builds). Needs a Python with this repository's requirements, torch with CUDA
# and TensorRT (e.g. the gpu image's /opt/venv, or `pip install -r docker/requirements-gpu.txt` on top of
# requirements/dev.txt's other pins). Prints what it finds; exits non-zero on the first failure.
#
#   benchmarks/gpu_session.sh [PYTHON] [SLICES]      # defaults: .venv/bin/python, 300
#
# Then copy the benchmark table into docs/benchmarks.md with the machine (GPU, driver, CPU) it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
slices=${2:-300}
"$python" - <<'EOF'
from model.runtimes.gpu import cuda_status, tensorrt_version
status = cuda_status()
print(f"GPU: {status.description}\nTensorRT: {tensorrt_version() or 'not installed'}")
raise SystemExit(0 if status.usable else 1)
EOF
# the GPU tests (they skip, saying why, where TensorRT is missing), then the CPU-side GPU-path tests
"$python" -m pytest -q -rs -m gpu tests/test_gpu_segment.py tests/test_gpu_runtime.py tests/test_tensorrt.py
"$python" -m pytest -q tests/test_gpu_segment.py tests/test_gpu_runtime.py tests/test_gpu_process.py tests/test_tensorrt.py
# an engine ahead of time, as for a deployment, then the four rows of the benchmark in one run
engines=$(mktemp -d)
"$python" -m model.build_engine model/packages/demo-phantom --check-only
if "$python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('tensorrt') or u.find_spec('tensorrt_bindings')))"; then
    "$python" -m model.build_engine model/packages/demo-phantom --out "$engines"
fi
"$python" benchmarks/bench_gpu.py --slices "$slices"
rm -rf "$engines"
