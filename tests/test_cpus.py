"""The CPUs a process is granted (preprocess/limits.py detect_granted_cpus), and the OpenVINO settings that use them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.limits import detect_granted_cpus
from tests.conftest import DEMO_MODEL, REPO

AFFINITY = len(os.sched_getaffinity(0))


def _cgroup_v2(root: Path, path: str, quotas: dict[str, str]) -> str:
    """A fake cgroup v2 tree: cpu.max in `path` and its parents as given; the /proc/self/cgroup text for `path`."""
    for folder, text in quotas.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(text + "\n")
    return f"0::{path}\n"


def test_without_limits_the_grant_is_every_cpu_the_process_may_run_on(tmp_path):
    grant = detect_granted_cpus({}, cgroup_root=tmp_path, proc_cgroup=_cgroup_v2(tmp_path, "/", {".": "max 100000"}))
    assert grant.count == AFFINITY and "sched_getaffinity" in grant.origin


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to see a quota below them")
def test_a_container_quota_of_one_and_a_half_cores_grants_one_thread(tmp_path):  # docker --cpus 1.5, a Kubernetes limit of 1500m
    grant = detect_granted_cpus({}, cgroup_root=tmp_path, proc_cgroup=_cgroup_v2(tmp_path, "/", {".": "150000 100000"}))
    assert grant.count == 1 and "1.5 cores" in grant.origin and str(tmp_path / "cpu.max") in grant.origin


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to see a quota below them")
def test_the_tightest_quota_on_the_cgroup_path_counts_a_parents_too(tmp_path):  # a Slurm job's cgroup under its step's
    text = _cgroup_v2(tmp_path, "/slurm/job_7/step_0", {"slurm": "max 100000", "slurm/job_7": "100000 100000", "slurm/job_7/step_0": "max 100000"})
    grant = detect_granted_cpus({}, cgroup_root=tmp_path, proc_cgroup=text)
    assert grant.count == 1 and "job_7" in grant.origin


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to see a quota below them")
def test_cgroup_v1_cfs_quota_is_read_too(tmp_path):
    (tmp_path / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    (tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    grant = detect_granted_cpus({}, cgroup_root=tmp_path, proc_cgroup="4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    assert grant.count == 1 and "cpu.cfs_quota_us" in grant.origin


def test_a_quota_below_one_core_still_grants_one_thread(tmp_path):
    grant = detect_granted_cpus({}, cgroup_root=tmp_path, proc_cgroup=_cgroup_v2(tmp_path, "/", {".": "20000 100000"}))
    assert grant.count == 1


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to see a Slurm grant below them")
def test_slurm_cpus_per_task_caps_the_grant_where_slurm_enforces_nothing(tmp_path):
    grant = detect_granted_cpus({"SLURM_CPUS_PER_TASK": "1"}, cgroup_root=tmp_path, proc_cgroup="")
    assert grant.count == 1 and grant.origin == "SLURM_CPUS_PER_TASK=1"
    assert detect_granted_cpus({"SLURM_CPUS_PER_TASK": str(AFFINITY + 8)}, cgroup_root=tmp_path, proc_cgroup="").count == AFFINITY


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to restrict the affinity to fewer")
def test_a_cpuset_of_one_cpu_makes_process_py_run_one_thread(tmp_path):
    """The real thing: taskset-like affinity (what Slurm's task/affinity and docker --cpuset-cpus set), seen by process.py."""
    code = (f"import os, sys; sys.path.insert(0, {str(REPO)!r}); os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); "
            "import process; args = process.parse_args(['--input', 'x']); print(args.threads, '|', args.threads_origin)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "SLURM_CPUS_PER_TASK": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1 | the CPUs this process may run on (sched_getaffinity)"


def test_openvino_compiles_with_the_granted_threads_and_no_pinning():
    pytest.importorskip("openvino")
    from model.package import load_model_package
    from model.runtimes.cpu import OpenVinoRunner

    with OpenVinoRunner(load_model_package(DEMO_MODEL), threads=1, precision="fp32") as runner:
        compiled = runner.request.get_compiled_model()
        assert str(compiled.get_property("ENABLE_CPU_PINNING")) == "False"
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
