"""A handful of the hostile-input corpus through the algorithm image, locked down harder than the platform does.

Every run: `--network none --read-only --cap-drop ALL --security-opt no-new-privileges --pids-limit 256
--memory 4g`, a read-only /input, a tmpfs /tmp, the image's own non-root user. The rest of the corpus runs
through the CLI (tests/test_hardening.py); this file shows the same contract holds inside the image, and
that the memory budget comes from the container's cgroup limit. Skips without a Docker engine, as
tests/test_containers.py (whose build and fixtures it shares) does; fails under CI=true.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import hardening_corpus as corpus
from tests.test_containers import make_readable, algorithm_image, docker_client  # noqa: F401  (fixtures)

RUN_TIMEOUT_S = 300
MEMORY = "4g"


def locked_down_run(client, image, *, input_dir: Path, output_dir: Path | None, output_tmpfs: str | None = None) -> tuple[int, str]:
    make_readable(input_dir)
    volumes = {str(input_dir): {"bind": "/input", "mode": "ro"}}
    tmpfs = {"/tmp": "rw,size=256m"}
    if output_dir is not None:
        volumes[str(output_dir)] = {"bind": "/output", "mode": "rw"}
    if output_tmpfs is not None:
        tmpfs["/output"] = output_tmpfs
    container = client.containers.run(
        image.id, detach=True, network_mode="none", read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"],
        pids_limit=256, mem_limit=MEMORY, memswap_limit=MEMORY, volumes=volumes, tmpfs=tmpfs,
    )
    try:
        code = container.wait(timeout=RUN_TIMEOUT_S)["StatusCode"]
        log = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    return code, log


def _gc_input(d: Path, write_ct, kind: str = "Image") -> Path:
    """Grand Challenge's layout: /input/images/ct/<pk>.<ext> (or DICOM files) and inputs.json."""
    write_ct(d / "images" / "ct")
    corpus.write_inputs_json(d, [corpus.socket(kind=kind)])
    return d


ITEMS = {
    "truncated-mha": (lambda d: _gc_input(d, lambda s: corpus.truncate(corpus.write_image(corpus.small_ct(), s / "3f1c.mha"))), 3, "3f1c.mha"),
    "mr-dicom-image-set": (lambda d: _gc_input(d, lambda s: corpus.dicom_series(s, modality="MR"), kind="DICOM Image Set"), 3,
                           "no CT image slices found (found modality MR)"),
    "inputs-json-path-traversal": (lambda d: corpus.write_inputs_json(d, [corpus.socket(relative_path="../../etc")]), 3, "outside the input folder"),
    # 512x512x3000 needs ~15 GiB: refused from its header under the container's 4 GiB cgroup limit
    "header-claims-512x512x3000": (lambda d: _gc_input(d, lambda s: (s.mkdir(parents=True), (s / "3f1c.mha").write_bytes(
        corpus.mha_header((512, 512, 3000), data=b"\0" * 64)))), 7, "512x512x3000 voxels (786 M) would need about"),
}


@pytest.mark.parametrize("make, code, message", ITEMS.values(), ids=ITEMS.keys())
def test_bad_input_in_the_image_fails_with_one_line_its_code_and_no_output(docker_client, algorithm_image, tmp_path, make, code, message):  # noqa: F811
    (tmp_path / "input").mkdir()
    make(tmp_path / "input")
    output = tmp_path / "output"
    output.mkdir()
    output.chmod(0o777)
    got, log = locked_down_run(docker_client, algorithm_image, input_dir=tmp_path / "input", output_dir=output)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert got == code, log
    assert len(errors) == 1 and message in errors[0], log
    left = sorted(p.name for p in output.rglob("*") if p.is_file())
    assert left in ([], ["results.json"]), left
    if code == 7:
        assert "the container's memory limit (/sys/fs/cgroup/" in errors[0], errors[0]
    if left:
        assert all(c["status"] == "failed" for c in json.loads((output / "results.json").read_text())["cases"])


def test_output_the_image_user_cannot_write_fails_up_front_with_code_5(docker_client, algorithm_image, tmp_path):  # noqa: F811
    _gc_input(tmp_path / "input", lambda s: corpus.write_image(corpus.small_ct(), s / "3f1c.mha"))
    output = tmp_path / "output"
    output.mkdir(mode=0o755)  # owned by root here: uid 1001 in the container cannot write it
    output.chmod(0o755)
    code, log = locked_down_run(docker_client, algorithm_image, input_dir=tmp_path / "input", output_dir=output)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 5 and len(errors) == 1 and "/output: output folder is not writable (Permission denied)" in errors[0], log
    assert list(output.iterdir()) == []


def test_a_full_output_disk_fails_the_case_with_code_5(docker_client, algorithm_image, tmp_path):  # noqa: F811
    """/output is a 16 KiB tmpfs: results.json fits, the mask of a 12x120x140 CT does not."""
    _gc_input(tmp_path / "input", lambda s: corpus.write_image(corpus.small_ct(5, (12, 120, 140)), s / "3f1c.mha"))
    code, log = locked_down_run(docker_client, algorithm_image, input_dir=tmp_path / "input", output_dir=None,
                                output_tmpfs="rw,size=16k,uid=1001,gid=1001,mode=0755")
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 5 and len(errors) == 1 and ("No space left" in errors[0] or "cannot write" in errors[0]), log


def test_the_image_user_cannot_change_the_code_or_the_bundled_model(docker_client, algorithm_image):  # noqa: F811
    probe = ("import os; print([p for p in ('/opt/app', '/opt/app/process.py', '/opt/app/model/packages/demo-phantom',"
             " '/opt/venv/lib') if os.access(p, os.W_OK)], os.getuid(), os.geteuid())")
    out = docker_client.containers.run(algorithm_image.id, entrypoint=["python", "-c", probe], network_mode="none", remove=True,
                                       cap_drop=["ALL"]).decode().split("\n")[0]
    assert out == "[] 1001 1001", out


def test_docker_stop_ends_the_run_cleanly_with_143(docker_client, algorithm_image, tmp_path):  # noqa: F811
    """`docker stop` (SIGTERM, as a platform stops a job at its time limit): one line, exit 143, no mask."""
    import time

    _gc_input(tmp_path / "input", lambda s: corpus.write_image(corpus.small_ct(6, (60, 200, 240)), s / "3f1c.mha"))
    make_readable(tmp_path / "input")
    output = tmp_path / "output"
    output.mkdir()
    output.chmod(0o777)
    container = docker_client.containers.run(
        algorithm_image.id, detach=True, network_mode="none", read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"],
        volumes={str(tmp_path / "input"): {"bind": "/input", "mode": "ro"}, str(output): {"bind": "/output", "mode": "rw"}},
        tmpfs={"/tmp": "rw,size=256m"},
    )
    try:
        time.sleep(3)
        container.stop(timeout=60)
        code = container.wait(timeout=RUN_TIMEOUT_S)["StatusCode"]
        log = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 143 and errors == ["error: stopped by SIGTERM: the case in progress was discarded"], log
    assert not list(output.rglob("*.mha"))
