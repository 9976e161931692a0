"""docs/slurm/trunkseg-array.sbatch on a real one-node Slurm cluster started here, then postprocess.merge.

The test installs nothing: it uses Debian's slurmctld, slurmd, slurm-client and munge (.ci/run installs
them), writes a munge key and a slurm.conf into a temporary folder, starts munged, slurmctld and slurmd
on localhost (proctrack/linuxproc and task/none: no cgroup plugin, so it runs in a container without
cgroup delegation), submits the array script over 8 small cases in 4 shards with `sbatch --wait`,
merges the shards and compares with one process. The array uses the venv runner (this checkout's
Python); a second test runs its docker runner with the algorithm image (tests/test_containers.py builds it). Without the Slurm binaries or root the test skips, saying why; under
CI=true that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postprocess import merge
from tests.cluster_helpers import assert_same_as_one_process, write_small_cases
from tests.conftest import REPO
from tests.test_containers import ALGORITHM, algorithm_image, docker_client, make_readable  # noqa: F401 (fixtures)

IN_CI = os.environ.get("CI") == "true"
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")
SBIN = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))
ARRAY_SCRIPT = REPO / "docs" / "slurm" / "trunkseg-array.sbatch"
RUN_ARGS = ["--threads", "1", "--runtime", "onnxruntime"]
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 600


def _unavailable(reason: str):
    """Skip, saying why; in CI the Slurm test must run, so fail instead."""
    if IN_CI:
        pytest.fail(f"CI must run the Slurm test: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


def _slurm_conf(root: Path, host: str, munge_socket: Path) -> str:
    return f"""\
ClusterName=trunkseg-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
PropagateResourceLimits=NONE
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={int(_memory_mb() * 0.8)} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _log_tail(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                     for p in sorted(root.glob("*.log")) + sorted(root.glob("*.out")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster: the environment its commands need (SLURM_CONF), and its folder."""
    missing = [b for b in BINARIES if shutil.which(b, path=SBIN) is None]
    if missing:
        _unavailable(f"Slurm or munge is not installed (no {', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        _unavailable("slurmd must run as root to start jobs")
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge.socket"
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SBIN}
    daemons: list[subprocess.Popen] = []

    def start(*command: str) -> None:
        log = open(root / f"{Path(command[0]).name}.stdout.log", "wb")
        daemons.append(subprocess.Popen([shutil.which(command[0], path=SBIN), *command[1:]], env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        start("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}", f"--pid-file={root / 'munged.pid'}",
              f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munged.seed'}")
        _wait_for(lambda: subprocess.run(["munge", "-n", "-S", str(munge_socket)], env=env, capture_output=True).returncode == 0, "munged", root)
        start("slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", host)
        _wait_for(lambda: _node_state(env) == "idle", "the node to be idle", root, daemons)
        yield env, root
    finally:
        for daemon in reversed(daemons):  # only the processes started here, each by its own handle
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()


def _node_state(env: dict) -> str:
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
    return done.stdout.strip().rstrip("*~#") if done.returncode == 0 else ""


def _wait_for(ready, what: str, root: Path, daemons=()) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        for daemon in daemons:
            if daemon.poll() is not None:
                pytest.fail(f"{daemon.args[0]} exited with {daemon.returncode} while waiting for {what}:\n{_log_tail(root)}", pytrace=False)
        time.sleep(0.25)
    pytest.fail(f"timed out after {START_TIMEOUT_S} s waiting for {what}:\n{_log_tail(root)}", pytrace=False)


def test_the_array_script_over_4_shards_merged_gives_what_one_process_gives(cluster, tmp_path):
    env, root = cluster
    cases = tmp_path / "in"
    write_small_cases(cases)
    out = tmp_path / "out"
    job_env = {**env, "TRUNKSEG_INPUT": str(cases), "TRUNKSEG_OUTPUT": str(out), "TRUNKSEG_RUNNER": "venv",
               "TRUNKSEG_HOME": str(REPO), "TRUNKSEG_PYTHON": sys.executable, "TRUNKSEG_ARGS": " ".join(RUN_ARGS)}
    started = time.monotonic()
    done = subprocess.run(["sbatch", "--wait", "--parsable", "--array=0-3", "--cpus-per-task=1", "--mem=1500M", "--time=10",
                           f"--output={root}/array-%A_%a.out", f"--chdir={tmp_path}", str(ARRAY_SCRIPT)],
                          env=job_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, f"sbatch: {done.stderr}\n{_log_tail(root)}"
    job_id = done.stdout.strip().split(";")[0]
    shards = sorted(out.glob("shard-*"))
    assert [p.name for p in shards] == [f"shard-{i}" for i in range(4)]
    logs = {i: (root / f"array-{job_id}_{i}.out").read_text() for i in range(4)}
    for i, text in logs.items():  # each task knew its shard from Slurm alone
        assert f"shard {i}/4 (SLURM_ARRAY_TASK_ID)" in text, text[-2000:]
    print(f"slurm array of 4 shards: {time.monotonic() - started:.1f} s")
    assert merge.main([*map(str, shards), "--output", str(tmp_path / "merged")]) == 0
    single = tmp_path / "single"
    done = subprocess.run([sys.executable, str(REPO / "process.py"), "--input", str(cases), "--output", str(single), *RUN_ARGS],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_one_process(tmp_path / "merged", single)


def test_the_array_script_runs_the_algorithm_image_with_docker(cluster, docker_client, algorithm_image, tmp_path):
    """The array script's docker runner (the default where docker works): each task runs the algorithm image with no
    network, a read-only root and the task's CPUs and memory; the merged shards' masks are the host's, byte for byte."""
    env, root = cluster
    cases = tmp_path / "in"
    ids = write_small_cases(cases, n=4)
    make_readable(cases)
    out = tmp_path / "out"
    job_env = {**env, "TRUNKSEG_INPUT": str(cases), "TRUNKSEG_OUTPUT": str(out), "TRUNKSEG_RUNNER": "docker",
               "TRUNKSEG_IMAGE": ALGORITHM, "TRUNKSEG_ARGS": " ".join(RUN_ARGS)}
    done = subprocess.run(["sbatch", "--wait", "--parsable", "--array=0-1", "--cpus-per-task=1", "--mem=1500M", "--time=10",
                           f"--output={root}/docker-%A_%a.out", f"--chdir={tmp_path}", str(ARRAY_SCRIPT)],
                          env=job_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, f"sbatch: {done.stderr}\n{_log_tail(root)}"
    job_id = done.stdout.strip().split(";")[0]
    for i in range(2):
        text = (root / f"docker-{job_id}_{i}.out").read_text()
        assert "runner docker" in text and f"shard {i}/2 (SLURM_ARRAY_TASK_ID)" in text, text[-2000:]
    assert merge.main([str(out / "shard-0"), str(out / "shard-1"), "--output", str(tmp_path / "merged")]) == 0
    single = tmp_path / "single"
    done = subprocess.run([sys.executable, str(REPO / "process.py"), "--input", str(cases), "--output", str(single), *RUN_ARGS],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    def by_case(results: Path) -> dict:  # each case's record but its input path (/input/... in the image) and timings
        cases = json.loads(results.read_text())["cases"]
        return {case["case_id"]: {k: v for k, v in case.items() if k not in ("input", "timings_s", "shard")} for case in cases}

    merged = by_case(tmp_path / "merged" / "results.json")
    assert sorted(merged) == ids and {case["status"] for case in merged.values()} == {"succeeded"}
    assert merged == by_case(single / "results.json")  # the measures too: same model, runtime and code in the image
    masks = {path.relative_to(single): path for path in (single / "images").rglob("*") if path.is_file()}
    assert masks and all((tmp_path / "merged" / relative).read_bytes() == path.read_bytes() for relative, path in masks.items())
