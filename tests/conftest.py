"""Shared fixtures: paths, the bundled demo model, tiny phantoms written to disk, and helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED_DATA = Path(os.environ.get("TRUNKSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
TS_EXAMPLE = SHARED_DATA / "totalsegmentator-example"
DEMO_MODEL = REPO / "model" / "packages" / "demo-phantom"


@pytest.fixture(scope="session")
def ts_example() -> Path:
    if not TS_EXAMPLE.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the real CT sample at {TS_EXAMPLE}")
        pytest.skip(f"real CT sample not found at {TS_EXAMPLE} (set TRUNKSEG_SHARED_DATA)")
    return TS_EXAMPLE


@pytest.fixture(scope="session")
def demo_package():
    from model.package import load_model_package

    return load_model_package(DEMO_MODEL)


def write_volume(array_zyx: np.ndarray, path: Path, *, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    import SimpleITK as sitk  # here, not at the top: the GPU tests collect on a machine without SimpleITK

    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def store_in_frame(volume_zyx: np.ndarray, geometry, frame: str):
    """The same physical image stored in another axis frame: (array, sitk-ready geometry kwargs).

    Uses SimpleITK's DICOMOrient as an independent implementation of the reorientation.
    """
    import SimpleITK as sitk

    image = geometry.apply_to(sitk.GetImageFromArray(volume_zyx))
    oriented = sitk.DICOMOrient(image, frame)
    return sitk.GetArrayFromImage(oriented), dict(spacing=oriented.GetSpacing(), origin=oriented.GetOrigin(), direction=oriented.GetDirection())


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and, for TensorRT tests, TensorRT); skipped with the reason where missing")
