"""benchmarks/gpu_session.py, the one GPU call's script: its rehearsal runs every step here as the GPU machine would
run it (SimpleITK, pydicom and openvino blocked, the networks' code from a staged folder), and one failing or late row
never ends the run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_session_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=240)


def test_rehearsal_runs_every_step_as_the_gpu_machine_would(tmp_path):
    deps = tmp_path / "deps"
    staged = run_script("--stage-deps", deps, cwd=tmp_path)
    assert staged.returncode == 0, staged.stderr
    assert (deps / "dynamic_network_architectures" / "architectures" / "unet.py").is_file()
    assert not list(deps.rglob("__pycache__"))

    out = tmp_path / "out"
    done = run_script("--rehearse", "--out", out, "--deps", deps, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    session = json.loads((out / "session.json").read_text())
    steps = session["steps"]
    assert list(steps) == ["environment", "pytest", "inputs", "agreement", "margins", "timings"]
    assert session["finished"] and session["failed_rows"] == []
    assert [(step, row["name"]) for step, body in steps.items() for row in body["rows"] if row["status"] != "ok"] == []

    environment = steps["environment"]["rows"][0]
    assert {environment["modules"][name] for name in ("SimpleITK", "pydicom", "openvino")} == {"absent"}
    assert str(deps) in environment["modules"]["dynamic_network_architectures"]  # the staged copy, as carried there
    tests = steps["pytest"]["rows"][0]
    assert tests["returncode"] == 0 and tests["counts"].get("skipped", 0) >= 9 and "failed" not in tests["counts"]
    assert "errors" not in tests["counts"] and "error" not in tests["counts"]  # every gpu test file collects without them

    agreement = steps["agreement"]["rows"]
    assert [row["name"] for row in agreement] == ["demo fp16", "demo fp32", "paper fp16", "paper fp32"]
    assert all(row["meets_bar"] and row["labels_compared"] > 3 for row in agreement)  # float32 on both sides here
    margins = steps["margins"]["rows"]
    assert [row["name"] for row in margins] == ["paper", "demo"]
    assert all(row["fp16_logits_finite"] and row["pixels"] > 0 and 0 <= row["flipped_share"] <= 1 for row in margins)
    timings = steps["timings"]["rows"]
    assert len(timings) == 1 + 2 * 3 * 3 and timings[0]["name"] == "transfers"
    for row in timings[1:]:
        assert row["wall_s"] > 0 and row["network_s"] > 0 and row["tiles"] >= row["slices"] == 6
        assert set(row["stages_s"]) == {"normalize_resample", "network", "blend", "resample_back_argmax"}
    assert [row["voxel_agreement"] for row in timings[1:] if row["voxel_agreement"] is not None] == [1.0] * 16

    report = (out / "report.md").read_text()
    assert "| paper fp16 graphs b32 |" in report and "| demo fp32 | torch-cuda-fp32" in report
    assert sorted(path.name for path in out.iterdir()) == ["pytest.log", "report.md", "session.json"]


def test_a_budget_used_up_skips_every_row_after_the_environment_and_still_writes_the_session(tmp_path):
    done = run_script("--rehearse", "--out", tmp_path / "out", "--budget-s", "0", "--skip", "pytest", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = json.loads((tmp_path / "out" / "session.json").read_text())["steps"]
    assert steps["environment"]["rows"][0]["status"] == "ok"
    assert list(steps) == ["environment", "inputs", "agreement", "margins", "timings"]
    assert {row["status"] for name in ("inputs", "agreement", "margins", "timings") for row in steps[name]["rows"]} == {"skipped"}


def test_a_failing_row_is_recorded_and_the_next_one_runs(tmp_path):
    gpu_session = load_script()
    session = gpu_session.Session(tmp_path, budget_s=60, meta={"mode": "test", "started_at": "now"})
    session.step("timings")
    assert session.run_row("timings", "breaks", lambda: {"wall_s": 1 / 0}) is None
    assert session.run_row("timings", "works", lambda: {"answer": 42})["status"] == "ok"
    session.budget_s = -1.0
    assert session.run_row("timings", "late", lambda: pytest.fail("a row past the budget must not run")) is None

    data = json.loads((tmp_path / "session.json").read_text())
    rows = data["steps"]["timings"]["rows"]
    assert [(row["name"], row["status"]) for row in rows] == [("breaks", "failed"), ("works", "ok"), ("late", "skipped")]
    assert rows[0]["error"] == "ZeroDivisionError: division by zero" and "1 / 0" in rows[0]["traceback"]
    assert data["failed_rows"] == ["timings/breaks"]


def test_json_ready_turns_numpy_numbers_and_non_finite_floats_into_json():
    import numpy as np

    gpu_session = load_script()
    ready = gpu_session.json_ready({1: np.float32(0.5), "x": [np.int64(3), float("nan"), np.float64("inf")], "s": "text"})
    assert json.dumps(ready, allow_nan=False) == '{"1": 0.5, "x": [3, null, null], "s": "text"}'


VARIANTS = REPO / "benchmarks" / "gpu_network_variants.py"
EAGER_VARIANTS = ["fp32", "fp32-tf32", "fp16-islands", "fp16-pure", "bf16-islands"]


def run_variants(out: Path, *only: str) -> dict:
    done = subprocess.run([sys.executable, str(VARIANTS), "--rehearse", "--out", str(out), "--only", *only],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "variants.json").read_text())


def test_network_variants_rehearse_every_eager_form_and_count_flops(tmp_path):
    """benchmarks/gpu_network_variants.py, rehearsed on the CPU as its GPU call runs: every eager form measures,
    FLOPs are counted and fp32 is its own reference (no flips)."""
    result = run_variants(tmp_path, *EAGER_VARIANTS)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == EAGER_VARIANTS and all(row["status"] == "ok" and row["seconds"] > 0 for row in rows.values())
    assert result["gflop_per_slice"] > 0 and result["limit_s"] > 0 and rows["fp32"]["flipped_vs_fp32"] == 0.0
    assert all(0 <= row["flipped_vs_fp32"] < 0.5 for row in rows.values())


def test_network_variants_rehearse_the_compiled_form(tmp_path):
    """torch.compile on the CPU needs a C++ compiler (inductor); the GPU machine has one."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler here: torch.compile's CPU backend needs one")
    rows = run_variants(tmp_path, "fp16-islands-compiled")["rows"]
    assert [row["status"] for row in rows] == ["ok"] and "compiled in" in rows[0]["note"]


def test_cold_start_rehearses_every_row_through_process_py_s_own_calls(tmp_path):
    """benchmarks/gpu_cold_start.py on the CPU: each row a fresh child process that starts the runtime as process.py
    does and segments; its phases add up to at most the spawn-to-labels time."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_cold_start.py"), "--rehearse", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "cold_start.json").read_text())["rows"]
    assert [(row["model"], row["variant"]) for row in rows] == [("demo", "product"), ("demo", "no-padding"), ("paper", "product"),
                                                               ("paper", "no-padding"), ("paper", "benchmark-off")]
    for row in rows:
        assert row["status"] == "ok" and row["labels_shape"] == [4, 64, 64] and row["runtime"] == "onnxruntime"
        phases = sum(row[k] for k in ("interpreter_s", "import_s", "package_s", "runtime_s", "load_s", "first_segment_s"))
        assert 0 < phases <= row["to_labels_s"] + 0.01 <= row["process_s"] + 0.01
