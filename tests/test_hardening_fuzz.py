"""Bounded coverage-guided fuzzing of the readers and inputs.json (benchmarks/fuzz_inputs.py, atheris), and its finds.

Each target runs for FUZZ_SECONDS in its own process (libFuzzer stops there; a crash, a hang or an
exception other than TrunkSegError fails the run and the input is kept as an artifact in tmp_path).
`TRUNKSEG_FUZZ_SECONDS` lengthens the run. Without atheris these skip (CI installs it: requirements/dev.txt).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from preprocess.dicom import read_dicom_series
from preprocess.errors import InputError
from tests.conftest import REPO

FUZZ_SECONDS = int(os.environ.get("TRUNKSEG_FUZZ_SECONDS", "12"))


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must fuzz: atheris is in requirements/dev.txt")
        return False
    return True


@pytest.mark.parametrize("target", ["inputs-json", "image", "dicom"])
def test_fuzzing_for_a_bounded_time_finds_no_crash_and_no_stray_exception(target, tmp_path):
    # RSS bound = the product's stated CPU memory bound (6 GiB): a clean-clone run once saw the DICOM target at 3.3 GiB
    if not _atheris_available():
        pytest.skip("atheris is not installed (pip install -r requirements/dev.txt)")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fuzz_inputs.py"), target, f"-max_total_time={FUZZ_SECONDS}", "-timeout=20",
         "-rss_limit_mb=6144", f"-artifact_prefix={tmp_path}/", "-seed=1", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 120,
    )
    tail = "\n".join(done.stderr.splitlines()[-30:])
    assert done.returncode == 0, f"fuzz target {target} failed (artifacts in {tmp_path}):\n{tail}"
    assert "Done" in done.stderr and "runs in" in done.stderr, tail
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]


def test_a_dicom_file_meta_element_of_odd_length_is_not_dicom_not_a_crash(tmp_path):
    """Found by the dicom target: pydicom raises BytesLengthException (not a ValueError) for it."""
    data = b"\0" * 128 + b"DICM" + struct.pack("<HH2sH", 2, 0, b"UL", 3) + b"\x01\x02\x03" + b"\0" * 64
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.dcm").write_bytes(data)
    with pytest.raises(InputError, match="no CT image slices found"):
        read_dicom_series(tmp_path / "s")


def test_a_nifti_header_with_a_nan_vox_offset_is_refused_or_read_never_a_stray_exception(tmp_path):
    """Found by the image target within seconds of adding the truncated-NIfTI length check."""
    import numpy as np
    import SimpleITK as sitk

    from preprocess.io import read_ct
    from tests import hardening_corpus as corpus

    path = corpus.write_image(corpus.small_ct(), tmp_path / "ct.nii", compress=False)
    data = bytearray(path.read_bytes())
    data[108:112] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    try:
        volume, geometry = read_ct(path)
    except InputError:
        return
    assert volume.shape == geometry.shape_zyx and np.isfinite(volume).all() and isinstance(sitk.Image, type)
