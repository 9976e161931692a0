"""docs/k8s/: the Indexed Job and its merge Job are valid Kubernetes objects, and their commands, run here once
per completion index the way the pods would run them, give what one process gives.

Validation is kubernetes-validate's (its bundled JSON schemas of the Kubernetes API, strict: unknown fields
are errors; no cluster needed). No cluster runs here: the pods' commands are run as local processes with
the image's paths (/opt/app, /opt/venv/bin/python, the volumes' mount paths) mapped to this checkout and
temporary folders, and JOB_COMPLETION_INDEX set as Kubernetes sets it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_helpers import assert_same_as_one_process, write_small_cases
from tests.conftest import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (pip install -r requirements/dev.txt)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -r requirements/dev.txt")

JOB = REPO / "docs" / "k8s" / "trunkseg-indexed-job.yaml"
MERGE = REPO / "docs" / "k8s" / "trunkseg-merge-job.yaml"
KUBERNETES_VERSIONS = ("1.27.0", "1.33.0")  # the oldest still commonly run, and a recent one
RUN_ARGS = ["--threads", "1", "--runtime", "onnxruntime"]


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("path", [JOB, MERGE], ids=lambda p: p.name)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_validate_against_the_kubernetes_api_schema(path, version):
    for document in _documents(path):
        kubernetes_validate.validate(document, version, strict=True)


def test_a_misspelt_field_fails_the_same_validation():  # the validation above can fail
    job = _documents(JOB)[0]
    job["spec"]["completionMod"] = job["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_job_is_indexed_locked_down_and_bounded():
    job, policy = _documents(JOB)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = _container(job)
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= spec["completions"]
    assert {e["name"]: e["value"] for e in container["env"]}["TRUNKSEG_SHARD_COUNT"] == str(spec["completions"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"]
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/input"]["readOnly"] is True and "/output" in mounts and "/tmp" in mounts  # /tmp: the root file system is read-only
    assert policy["kind"] == "NetworkPolicy" and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def _local_command(job: dict, folders: dict[str, Path]) -> tuple[list[str], dict[str, str], Path]:
    """The pod's command with the image's paths mapped onto this machine: (argv, environment, working folder)."""
    container = _container(job)
    mapping = {"/opt/venv/bin/python": sys.executable, "/opt/app": str(REPO)}
    for mount in container["volumeMounts"]:
        mapping[mount["mountPath"]] = str(folders[mount["name"]])
    pattern = re.compile("|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)) + r"(?=[/\s\"']|$)")
    argv = [pattern.sub(lambda m: mapping[m.group(0)], part) for part in [*container["command"], *container.get("args", [])]]
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    cwd = Path(mapping.get(container.get("workingDir", "/opt/app"), REPO))
    return argv, env, cwd


def test_running_each_completion_index_then_the_merge_job_gives_what_one_process_gives(tmp_path):
    cases = tmp_path / "input"
    write_small_cases(cases)
    folders = {"input": cases, "output": tmp_path / "output", "tmp": tmp_path / "tmp"}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    job = _documents(JOB)[0]
    argv, env, cwd = _local_command(job, folders)
    argv[-1] += " " + " ".join(RUN_ARGS)  # the same runtime and threads as the single run compared with
    for index in range(job["spec"]["completions"]):
        done = subprocess.run(argv, env={**env, "JOB_COMPLETION_INDEX": str(index)}, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"shard {index}/4 (JOB_COMPLETION_INDEX)" in done.stderr
    argv, env, cwd = _local_command(_documents(MERGE)[0], folders)
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    single = tmp_path / "single"
    done = subprocess.run([sys.executable, str(REPO / "process.py"), "--input", str(cases), "--output", str(single), *RUN_ARGS],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_one_process(folders["output"] / "merged", single)
