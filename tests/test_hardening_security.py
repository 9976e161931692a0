"""Security posture that can be checked without an engine: hash-pinned image dependencies, no unpickling at
run time, model packages verified before use. (The image's user, read-only root and no network are run
in tests/test_hardening_containers.py and tests/test_containers.py.)"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil

import numpy as np
import pytest

import process
from tests import hardening_corpus as corpus
from tests.conftest import DEMO_MODEL, REPO


def _lock_module():
    spec = importlib.util.spec_from_file_location("trunkseg_lock_requirements", REPO / "docker" / "lock_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, version = re.split(r"==", line.split()[0])
            pins[lock.normalise(name)] = version
    return pins


def test_image_lock_files_are_current_with_their_requirements():
    assert lock.stale_locks() == [], "run .venv/bin/python docker/lock_requirements.py"


@pytest.mark.parametrize("name", sorted(lock.SETS))
def test_every_locked_wheel_is_pinned_by_version_and_sha256_and_keeps_the_top_level_pins(name):
    lines = [line for line in (lock.LOCK_DIR / f"{name}.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[a-z0-9-]+==[^ ]+ --hash=sha256:[0-9a-f]{64}", line), line
    locked = _pins(lock.LOCK_DIR / f"{name}.txt")
    for package, version in _pins(lock.SETS[name]).items():
        assert locked.get(package) == version, (package, version, locked.get(package))


def test_the_images_install_the_locks_with_require_hashes():
    build = (REPO / "build.sh").read_text()
    assert 'requirements=requirements/lock/$set.txt' in build and "--require-hashes" in build
    for dockerfile in (REPO / "Dockerfile", REPO / "evaluation" / "Dockerfile"):
        assert "$hashes -r /wheels/requirements.txt" in dockerfile.read_text() and "--require-hashes" in dockerfile.read_text()


RUN_TIME_CODE = ["process.py", "preprocess", "model", "postprocess", "evaluation"]
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# The one place that reads a pickle-based file: the offline nnU-Net importer, with torch's weights-only
# unpickler and an allow-list (it also imports pickle for the UnpicklingError it catches).
IMPORTER = "model/import_nnunet.py"


def _python_files():
    for entry in RUN_TIME_CODE:
        path = REPO / entry
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_run_time_code_never_unpickles():
    findings = []
    for path in _python_files():
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in UNPICKLERS for n in names) and relative != IMPORTER:
                    findings.append(f"{relative}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                keywords = {k.arg: k.value for k in node.keywords}
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                if node.func.attr == "load" and owner == "torch":
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        findings.append(f"{relative}:{node.lineno} torch.load without weights_only=True")
                if node.func.attr in ("load", "loads") and owner in ("np", "numpy"):
                    allow = keywords.get("allow_pickle")
                    if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                        findings.append(f"{relative}:{node.lineno} numpy load with allow_pickle")
    assert findings == []


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: p.joinpath("weights.safetensors").write_bytes(p.joinpath("weights.safetensors").read_bytes()[:-1] + b"\0"), "SHA-256 does not match"),
        (lambda p: p.joinpath("model.onnx").write_bytes(b"\x08\x07" + p.joinpath("model.onnx").read_bytes()[2:]), "SHA-256 does not match"),
        (lambda p: p.joinpath("model.onnx").unlink(), "is missing"),
        (lambda p: _edit_card(p, lambda card: card["files"][next(iter(card["files"]))].update(path="../outside.onnx")), "leaves the package folder"),
    ],
    ids=["weights-one-byte", "onnx-header", "onnx-missing", "path-out-of-the-package"],
)
def test_an_altered_model_package_is_refused_at_start_with_code_4(tmp_path, capsys, tamper, message):
    package = shutil.copytree(DEMO_MODEL, tmp_path / "model")
    tamper(package)
    corpus.write_image(corpus.small_ct(), tmp_path / "in" / "ct.mha")
    code = process.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(package), "--threads", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 4 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out" / "images").exists()


def _edit_card(package, edit) -> None:
    card = json.loads((package / "model.json").read_text())
    edit(card)
    (package / "model.json").write_text(json.dumps(card))
