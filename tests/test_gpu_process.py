"""process.py with a GPU runtime: the device pipeline, results.json and the logged fallback, with a stand-in for the GPU.

The stand-in behaves as a GPU runtime to process.py (a DevicePipeline: device and run_device on tensors) and computes with
ONNX Runtime on the CPU device, so the wiring is tested here; the real GPU runtimes are tested in
tests/test_gpu_runtime.py and tests/test_tensorrt.py (marked `gpu`).
"""

from __future__ import annotations

import numpy as np
import pytest

from model.runtimes import choice as runtime_choice
from common.errors import RuntimeUnavailableError


class DevicePipelineStandIn:
    """Behaves as a GPU runtime to process.py (a DevicePipeline: device and run_device on tensors), computing with ONNX Runtime on the CPU."""

    device, preferred_batch_size = "cpu", 4

    def __init__(self, package, *, name="torch-cuda-fp16", fails_with=None):
        from model.runtimes.cpu import OnnxRuntimeRunner

        self.name, self.fails_with = name, fails_with
        self.inner = OnnxRuntimeRunner(package, threads=2)
        self.calls = 0

    def __enter__(self):
        if self.fails_with is not None:
            raise self.fails_with
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)

    def run_device(self, batch):
        import torch

        self.calls += 1
        return torch.from_numpy(self.inner(batch.numpy()))


@pytest.fixture()
def small_ct(tmp_path):
    import SimpleITK as sitk

    from model.phantom import make_phantom

    phantom = make_phantom(3, size_xy=(220, 200), spacing_mm=(1.2, 1.2, 1.0), n_slices=4)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(phantom.ct_zyx)), str(tmp_path / "in" / "case.mha"))
    return tmp_path


def _mask(folder):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "images" / "muscle-segmentation" / "case.mha")))


def test_process_runs_a_gpu_runtime_through_the_device_pipeline_and_falls_back_when_one_fails(small_ct, monkeypatch, capsys):
    pytest.importorskip("torch")
    import json

    import process
    from model.runtimes.choice import RuntimeChoice

    common = ["--input", str(small_ct / "in"), "--threads", "2"]
    assert process.main([*common, "--output", str(small_ct / "cpu"), "--runtime", "onnxruntime", "--precision", "fp32"]) == 0

    stand_ins = []

    def open_stand_in(name, package, *, precision, log):
        runner = DevicePipelineStandIn(package, name=f"{name}-{precision}",
                                       fails_with=RuntimeUnavailableError("engine build failed") if name == "tensorrt" else None)
        stand_ins.append(runner)
        return runner

    monkeypatch.setattr(runtime_choice, "open_gpu_runtime", open_stand_in)
    monkeypatch.setattr(runtime_choice, "choose_runtime", lambda requested: RuntimeChoice("tensorrt", "stand-in GPU", ("torch-cuda", "onnxruntime")))
    assert process.main([*common, "--output", str(small_ct / "gpu")]) == 0
    err = capsys.readouterr().err
    assert "runtime tensorrt failed to start (engine build failed); falling back to torch-cuda" in err
    results = json.loads((small_ct / "gpu" / "results.json").read_text())
    assert results["runtime"]["name"] == "torch-cuda" and results["runtime"]["precision"] == "fp16"
    assert results["runtime"]["failed_to_start"] == ["tensorrt failed to start: engine build failed"]
    assert results["cases"][0]["runtime"] == "torch-cuda"
    assert stand_ins[-1].calls == 1  # 4 slices of one tile, in one batch of the runtime's preferred size
    assert np.mean(_mask(small_ct / "gpu") == _mask(small_ct / "cpu")) >= 0.999
