"""The two container images, built with ./build.sh and run the way Grand Challenge runs them (docker SDK).

Each image is built once per session, the cpu flavour, on `trunkseg-base:bookworm` (made with debootstrap:
no image registry is reachable here) unless BASE_IMAGE names another base. Every run is the platform's:
`--network none`, a read-only /input, a scratch volume on /tmp, the image's own non-root user. The input
is the bundled sample (samples/demo). Without a Docker engine these tests skip, saying why; under CI=true
a missing engine, SDK or base image is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _load_helper(name: str):
    """docker/<name>.py by path: a folder named docker/ must not shadow the docker SDK package."""
    spec = importlib.util.spec_from_file_location(f"trunkseg_docker_{name}", REPO / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_sample = _load_helper("make_sample")
check_outputs = _load_helper("check_outputs")

ALGORITHM = "trunkseg-algorithm:cpu"
EVALUATION = "trunkseg-evaluation:latest"
LOCAL_BASE = "trunkseg-base:bookworm"
CONTAINER_UID = 1001
SIZE_LIMIT_MB = 1000  # 929 MB measured with OpenVINO (the default CPU runtime) and highdicom
BUILD_TIMEOUT_S = 1500
RUN_TIMEOUT_S = 300
IN_CI = os.environ.get("CI") == "true"
SLUG = "muscle-segmentation"
DEMO_MEAN_DICE = 0.954  # README.md: the bundled sample against its sparse ground truth
DEMO_MEAN_DICE_TOLERANCE = 0.001  # README rounds to 3 decimals; measured 0.954242 with OpenVINO (1 and 2 threads), ONNX Runtime and torch alike


def _unavailable(reason: str):
    """Skip, saying why; in CI the images must be tested, so fail instead."""
    if IN_CI:
        pytest.fail(f"CI must test the container images: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker
    except ImportError:
        docker = None
    if not hasattr(docker, "from_env"):  # not installed (or only the repository's docker/ folder was found)
        _unavailable("the docker Python SDK is not installed (pip install -r requirements/dev.txt)")
    try:
        client = docker.from_env(timeout=RUN_TIMEOUT_S)
        client.ping()
    except Exception as error:  # DockerException, requests' and socket errors
        _unavailable(f"no Docker engine reachable ({type(error).__name__}: {str(error)[:160]}); start dockerd or set DOCKER_HOST")
    yield client
    client.close()


def _build(docker_client, *args: str) -> None:
    """./build.sh ... cpu: on the local debootstrap base unless BASE_IMAGE is set."""
    command = ["./build.sh", *args, "cpu"]
    if not os.environ.get("BASE_IMAGE"):
        try:
            docker_client.images.get(LOCAL_BASE)
        except Exception:
            if shutil.which("debootstrap") is None:
                _unavailable(f"no base image: {LOCAL_BASE} is missing, debootstrap is not installed (apt-get install -y debootstrap) and BASE_IMAGE is not set")
        command.insert(1, "--local-base")
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}", pytrace=False)
    print(f"{' '.join(command)}: {time.monotonic() - started:.0f} s\n{done.stdout.strip()}")


@pytest.fixture(scope="session")
def algorithm_image(docker_client):
    _build(docker_client, "--only", "algorithm")
    return docker_client.images.get(ALGORITHM)


@pytest.fixture(scope="session")
def evaluation_image(docker_client):
    if not (REPO / "evaluation" / "__main__.py").is_file():
        _unavailable("evaluation/__main__.py does not exist yet: the evaluation image has no entry point")
    _build(docker_client, "--only", "evaluation")
    return docker_client.images.get(EVALUATION)


def make_readable(folder: Path) -> None:
    """Let the container's user read what the host wrote."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def gc_run(client, image, *, input_dir: Path, output_dir: Path, mounts: dict | None = None, read_only: bool = False,
           tmpfs_tmp: bool = False) -> tuple[int, str]:
    """`docker run --rm --network none -v input:/input:ro -v output:/output -v <volume>:/tmp [-v X:Y:ro] IMAGE`,
    as the image's own USER (or --read-only with a tmpfs /tmp); returns (exit code, log)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    output_dir.chmod(0o777)  # the container's user writes here
    volumes = {str(input_dir): {"bind": "/input", "mode": "ro"}, str(output_dir): {"bind": "/output", "mode": "rw"}}
    for host, target in (mounts or {}).items():
        volumes[str(host)] = {"bind": target, "mode": "ro"}
    scratch, tmpfs = None, None
    if tmpfs_tmp:
        tmpfs = {"/tmp": "rw,size=512m"}
    else:
        scratch = client.volumes.create(f"trunkseg-test-tmp-{uuid.uuid4().hex[:12]}")
        volumes[scratch.name] = {"bind": "/tmp", "mode": "rw"}
    container = client.containers.run(image.id, detach=True, network_mode="none", volumes=volumes, read_only=read_only, tmpfs=tmpfs)
    try:
        code = container.wait(timeout=RUN_TIMEOUT_S)["StatusCode"]
        log = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
        if scratch is not None:
            scratch.remove(force=True)
    return code, log


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """The bundled sample CT as Grand Challenge hands it over, and a model package for /opt/ml/model."""
    folder = tmp_path_factory.mktemp("container-sample")
    info = make_sample.algorithm_input(make_sample.BUNDLED_CT, folder / "input")
    info["override"] = make_sample.override_model(REPO / "model" / "packages" / "demo-phantom", folder / "model")
    make_readable(folder)
    return info


@pytest.fixture(scope="module")
def algorithm_run(docker_client, algorithm_image, sample, tmp_path_factory):
    output = tmp_path_factory.mktemp("container-output") / "output"
    code, log = gc_run(docker_client, algorithm_image, input_dir=Path(sample["input"]), output_dir=output)
    return code, log, output


def _mask(output: Path, sample: dict) -> Path:
    return output / "images" / SLUG / f"{sample['case_id']}.mha"


def _probe(client, image, code: str) -> list[str]:
    """Run a line of Python in the image (its own user, no network) and return what it printed, split."""
    return client.containers.run(image.id, entrypoint=["python", "-c", code], network_mode="none", remove=True).decode().split()


# --- the algorithm image -------------------------------------------------------------------------


def test_algorithm_image_is_built_as_the_platform_expects(docker_client, algorithm_image):
    config = algorithm_image.attrs["Config"]
    user = config.get("User") or "root"
    assert user.split(":")[0] not in ("", "0", "root"), f"the image runs as {user!r}"
    assert config["Entrypoint"][-1] == "/opt/app/process.py"
    size_mb = algorithm_image.attrs["Size"] / 1e6
    assert size_mb < SIZE_LIMIT_MB, f"{ALGORITHM} is {size_mb:.0f} MB"
    # No torch, no compilers, no pip, no wheels or pip caches; the bundled model is readable by the user.
    probe = (
        "import importlib.util as u, os, shutil;"
        "print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None, u.find_spec('pip') is None,"
        " [c for c in ('gcc', 'cc', 'g++', 'c++', 'clang', 'make', 'pip', 'pip3') if shutil.which(c)],"
        " [p for p in ('/wheels', '/root/.cache', os.path.expanduser('~/.cache')) if os.path.exists(p)],"
        " os.access('/opt/app/model/packages/demo-phantom/weights.safetensors', os.R_OK), os.getuid())"
    )
    assert _probe(docker_client, algorithm_image, probe) == ["True", "True", "True", "[]", "[]", "True", str(CONTAINER_UID)]


def test_algorithm_runs_like_grand_challenge(algorithm_run, sample):
    code, log, output = algorithm_run
    assert code == 0, log
    problems = check_outputs.check_algorithm_output(Path(sample["input"]), output)
    assert not problems, "\n".join(problems) + "\n" + log
    results = json.loads((output / "results.json").read_text())
    assert results["runtime"]["name"] == "openvino", "no GPU: the CPU image takes OpenVINO, its fastest CPU runtime"
    assert results["model"]["folder"] == "/opt/app/model/packages/demo-phantom"
    assert _mask(output, sample).stat().st_uid == CONTAINER_UID, "the image's own non-root user wrote the output"


def test_container_agrees_with_the_pipeline_on_the_host(algorithm_run, sample, tmp_path):
    """The image runs the repository's code and model: its mask is the one process.py makes here."""
    import process

    code, log, output = algorithm_run
    assert code == 0, log
    host_output = tmp_path / "host"
    assert process.main(["--input", sample["input"], "--output", str(host_output), "--runtime", "openvino", "--precision", "fp32"]) == 0
    container_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(_mask(output, sample))))
    host_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(_mask(host_output, sample))))
    agreement = float(np.mean(container_mask == host_mask))
    assert agreement > 0.999, f"container and host masks agree on only {agreement:.4%} of voxels"
    assert len(np.unique(container_mask)) > 1, "the mask is empty"


def test_model_mount_replaces_the_bundled_model(docker_client, algorithm_image, sample, tmp_path):
    code, log = gc_run(docker_client, algorithm_image, input_dir=Path(sample["input"]), output_dir=tmp_path / "out",
                       mounts={sample["override"]["model"]: "/opt/ml/model"})
    assert code == 0, log
    problems = check_outputs.check_algorithm_output(Path(sample["input"]), tmp_path / "out", model_identity=sample["override"]["identity"])
    assert not problems, "\n".join(problems) + "\n" + log
    assert json.loads((tmp_path / "out" / "results.json").read_text())["model"]["folder"] == "/opt/ml/model"


def test_empty_input_fails_and_writes_nothing(docker_client, algorithm_image, tmp_path):
    (tmp_path / "input").mkdir()
    code, log = gc_run(docker_client, algorithm_image, input_dir=tmp_path / "input", output_dir=tmp_path / "out")
    assert code == 3, log
    assert list((tmp_path / "out").iterdir()) == []
    assert log.count("error:") == 1 and "empty" in log, log


def test_broken_model_mount_fails_clearly(docker_client, algorithm_image, sample, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(sample["override"]["model"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    make_readable(broken)
    code, log = gc_run(docker_client, algorithm_image, input_dir=Path(sample["input"]), output_dir=tmp_path / "out",
                       mounts={broken: "/opt/ml/model"})
    assert code == 4, log
    assert "error:" in log and "model.onnx" in log, log
    assert not (tmp_path / "out" / "images").exists()


def test_read_only_root_filesystem(docker_client, algorithm_image, sample, tmp_path):
    code, log = gc_run(docker_client, algorithm_image, input_dir=Path(sample["input"]), output_dir=tmp_path / "out",
                       read_only=True, tmpfs_tmp=True)
    assert code == 0, log
    problems = check_outputs.check_algorithm_output(Path(sample["input"]), tmp_path / "out")
    assert not problems, "\n".join(problems) + "\n" + log


def test_real_ct_in_the_container(docker_client, algorithm_image, ts_example, tmp_path):
    """A real CT (int32 HU, stored RAS-wise, uploaded as .nii.gz): Grand Challenge re-encodes it as <pk>.mha."""
    info = make_sample.algorithm_input(ts_example / "example_ct.nii.gz", tmp_path / "input")
    make_readable(tmp_path / "input")
    code, log = gc_run(docker_client, algorithm_image, input_dir=tmp_path / "input", output_dir=tmp_path / "out")
    assert code == 0, log
    problems = check_outputs.check_algorithm_output(tmp_path / "input", tmp_path / "out")
    assert not problems, "\n".join(problems) + "\n" + log
    ct = sitk.ReadImage(str(ts_example / "example_ct.nii.gz"))
    mask = sitk.ReadImage(str(_mask(tmp_path / "out", info)))
    assert mask.GetSize() == ct.GetSize()
    np.testing.assert_allclose(mask.GetDirection(), ct.GetDirection(), atol=1e-6)


# --- the evaluation image ------------------------------------------------------------------------


def test_evaluation_image_is_built_as_the_platform_expects(docker_client, evaluation_image):
    config = evaluation_image.attrs["Config"]
    assert (config.get("User") or "root").split(":")[0] not in ("", "0", "root")
    assert config["Entrypoint"][-2:] == ["-m", "evaluation"]
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is None, u.find_spec('pip') is None)"
    assert _probe(docker_client, evaluation_image, probe) == ["True", "True", "True"]
    assert evaluation_image.attrs["Size"] / 1e6 < SIZE_LIMIT_MB


def _evaluate(docker_client, image, tmp_path: Path, prediction: Path) -> dict:
    """One job whose input was the bundled sample, its output `prediction`; the sample's ground truth folder
    (sparse labels and levels.json) as the phase's ground truth."""
    make_sample.evaluation_input(tmp_path / "input", {"phantom-demo.mha": prediction})
    truth = tmp_path / "ground_truth"
    shutil.copytree(make_sample.BUNDLED_TRUTH_DIR, truth)
    make_readable(tmp_path / "input")
    make_readable(truth)
    code, log = gc_run(docker_client, image, input_dir=tmp_path / "input", output_dir=tmp_path / "out",
                       mounts={truth: "/opt/ml/input/data/ground_truth"}, read_only=True)
    assert code == 0, log
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    metrics["_log"] = log
    return metrics


def test_evaluation_runs_like_grand_challenge(docker_client, evaluation_image, tmp_path):
    """The dense truth as the prediction (a perfect algorithm): the platform's layout in, mean Dice 1 out."""
    metrics = _evaluate(docker_client, evaluation_image, tmp_path, make_sample.BUNDLED_DENSE_TRUTH)
    problems = check_outputs.check_evaluation_output(tmp_path / "out", perfect=True)
    assert not problems, "\n".join(problems) + "\n" + metrics["_log"]
    assert "phantom-demo" in json.dumps(metrics), "metrics.json does not name the case"


def test_evaluation_scores_what_the_algorithm_image_wrote(docker_client, evaluation_image, algorithm_run, sample, tmp_path):
    """The platform's chain: the algorithm image's output, a job of predictions.json, scored by the evaluation image."""
    code, log, output = algorithm_run
    assert code == 0, log
    metrics = _evaluate(docker_client, evaluation_image, tmp_path, _mask(output, sample))
    problems = check_outputs.check_evaluation_output(tmp_path / "out")
    assert not problems, "\n".join(problems) + "\n" + metrics["_log"]
    mean_dice = metrics["aggregates"]["dice"]["overall"]["mean"]
    # README.md states 0.954 for this sample (`make demo`). The run is deterministic on one machine; another CPU or
    # thread count may move a few boundary voxels (OpenVINO's fp32 kernels differ by instruction set), which moves
    # this 13-slice mean by far less than the tolerance.
    assert mean_dice == pytest.approx(DEMO_MEAN_DICE, abs=DEMO_MEAN_DICE_TOLERANCE), (
        f"the demo model scores a mean Dice of {mean_dice} on its own sample, README.md says {DEMO_MEAN_DICE}\n{metrics['_log']}")
