#!/usr/bin/env bash
# The GPU path measured in one run (issue 18): a thin wrapper of benchmarks/gpu_session.py, which does it all in
# under 8 minutes on a data-centre GPU: the GPU, driver, torch and CUDA; the `gpu` tests (TensorRT's skip saying why
# where it is missing); fp16 on the GPU against ONNX Runtime fp32 on the CPU (demo and paper-sized networks, per-label
# Dice against docs/gpu.md's bar); and the device pipeline's end-to-end timings on a 512x512x300 CT (fp32, fp16, fp16 +
# CUDA graphs at batch 1, 8, 32). It writes DIR/session.json (after every row), DIR/report.md and DIR/pytest.log, and
# exits non-zero if any row failed. Needs torch with CUDA, numpy, scipy, onnx, onnxruntime, safetensors and pytest; no
# SimpleITK, pydicom or openvino. Where dynamic_network_architectures is missing, stage it beforehand with
# `python benchmarks/gpu_session.py --stage-deps` (into .gpu-deps/, taken up from there).
#
#   benchmarks/gpu_session.sh [PYTHON] [DIR] [gpu_session.py options ...]   # defaults: python3, gpu-session-out
#   benchmarks/gpu_session.sh .venv/bin/python /tmp/rehearsal --rehearse      # the same code on the CPU, tiny inputs
#
# Not part of it (they need SimpleITK or TensorRT): engine builds (`python -m model.build_engine PKG`) and process.py
# end to end per runtime (benchmarks/bench_gpu.py). Copy the tables into docs/benchmarks.md with the machine they ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
out=${2:-gpu-session-out}
shift $(( $# < 2 ? $# : 2 ))
exec "$python" benchmarks/gpu_session.py --out "$out" "$@"
