"""GPU runtime choice and fallback (checked here with stand-ins for the GPU), and, marked `gpu`, the PyTorch CUDA runner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from model.runtimes import gpu as runtime_gpu
from model.runtimes.choice import segmenter_for, start_runtime
from model.runtimes.gpu import CudaStatus, choose_gpu_runtime
from model.runtimes.precision import choose_gpu_precision
from common.errors import ModelPackageError, RuntimeUnavailableError
from tests.gpu_helpers import NO_CUDA_REASON, has_cuda

GPU = CudaStatus(True, "NVIDIA H100 (sm 9.0, 80 GiB, driver 580.65, torch 2.13.0 with CUDA 13.0)")
NO_GPU = CudaStatus(False, "no usable CUDA GPU (in a container, run it with --gpus all)")


@pytest.fixture()
def machine(monkeypatch):
    """Set what this 'machine' has: a GPU or not, TensorRT or not."""

    def set_(*, status: CudaStatus, tensorrt: str | None):
        monkeypatch.setattr(runtime_gpu, "cuda_status", lambda: status)
        monkeypatch.setattr(runtime_gpu, "tensorrt_version", lambda: tensorrt)

    return set_


def test_auto_prefers_tensorrt_then_torch_cuda_then_the_cpu(machine):
    machine(status=GPU, tensorrt="10.13.3.9")
    choice = choose_gpu_runtime("auto", cpu_fallback="onnxruntime")
    assert choice.name == "tensorrt" and choice.fallbacks == ("torch-cuda", "onnxruntime")
    assert "TensorRT 10.13.3.9" in choice.reason and "H100" in choice.reason
    machine(status=GPU, tensorrt=None)
    choice = choose_gpu_runtime("auto", cpu_fallback="onnxruntime")
    assert choice.name == "torch-cuda" and choice.fallbacks == ("onnxruntime",) and "TensorRT not installed" in choice.reason
    machine(status=NO_GPU, tensorrt="10.13.3.9")
    choice = choose_gpu_runtime("auto", cpu_fallback="onnxruntime")
    assert choice.name is None and "--gpus all" in choice.reason


def test_explicit_tensorrt_without_it_or_a_gpu_is_an_error(machine):
    machine(status=GPU, tensorrt=None)
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed"):
        choose_gpu_runtime("tensorrt", cpu_fallback="onnxruntime")
    machine(status=NO_GPU, tensorrt="10.13.3.9")
    with pytest.raises(RuntimeUnavailableError, match="no usable CUDA GPU"):
        choose_gpu_runtime("tensorrt", cpu_fallback="onnxruntime")
    machine(status=GPU, tensorrt="10.13.3.9")
    choice = choose_gpu_runtime("tensorrt", cpu_fallback="onnxruntime")
    assert choice.name == "tensorrt" and choice.fallbacks == ()  # asked for: no substitute


def test_this_machine_reports_why_it_has_no_gpu():
    status = runtime_gpu.cuda_status()
    if not has_cuda():
        assert not status.usable and status.description


def test_gpu_precision_is_fp16_unless_fp32_is_asked_for():
    assert choose_gpu_precision("auto", runtime="tensorrt").name == "fp16"
    assert choose_gpu_precision("fp32", runtime="torch-cuda").name == "fp32"
    with pytest.raises(RuntimeUnavailableError, match="int8"):
        choose_gpu_precision("int8", runtime="tensorrt")


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Precision:
    name: str
    reason: str = "test"
    verified: bool = True


class FakeRuntime:
    def __init__(self, name, fails_with=None, events=None):
        self.name, self.fails_with, self.events = name, fails_with, events

    def __enter__(self):
        if self.fails_with is not None:
            raise self.fails_with
        self.events.append(f"enter {self.name}")
        return self

    def __exit__(self, *exc):
        self.events.append(f"exit {self.name}")


def _start(failing: dict, first=Choice("tensorrt", "TensorRT on a GPU", ("torch-cuda", "onnxruntime"))):
    events, lines = [], []
    opener = lambda choice, precision: FakeRuntime(choice.name, failing.get(choice.name), events)  # noqa: E731
    precision = lambda name: Precision("fp16" if name in ("tensorrt", "torch-cuda") else "fp32")  # noqa: E731
    return start_runtime(first, None, open_runtime=opener, choose_precision=precision, log=lines.append), events, lines


def test_a_runtime_that_fails_to_start_falls_back_logged_and_recorded():
    started, events, lines = _start({"tensorrt": RuntimeUnavailableError("engine build failed")})
    with started as run:
        assert run.choice.name == "torch-cuda" and run.runtime.name == "torch-cuda" and run.precision.name == "fp16"
        assert run.failures == ("tensorrt failed to start: engine build failed",)
        assert "fallback after tensorrt failed to start" in run.choice.reason and run.choice.fallbacks == ()
    assert events == ["enter torch-cuda", "exit torch-cuda"]
    assert lines == ["runtime tensorrt failed to start (engine build failed); falling back to torch-cuda"]


def test_cuda_errors_fall_through_to_the_cpu():
    started, events, _ = _start({"tensorrt": RuntimeError("CUDA error: out of memory"), "torch-cuda": RuntimeError("CUDA error: out of memory")})
    with started as run:
        assert run.choice.name == "onnxruntime" and run.precision.name == "fp32" and len(run.failures) == 2


def test_no_fallback_for_a_bad_model_package_or_when_nothing_is_left():
    started, _, _ = _start({"tensorrt": ModelPackageError("model.onnx: SHA-256 does not match")})
    with pytest.raises(ModelPackageError):
        with started:
            pass
    started, _, _ = _start({"tensorrt": RuntimeUnavailableError("no engine")}, first=Choice("tensorrt", "requested"))
    with pytest.raises(RuntimeUnavailableError, match="no engine"):
        with started:
            pass


def test_cpu_runtimes_keep_the_numpy_segmenter_and_gpu_runtimes_get_the_device_one():
    from model.segment import segment_volume

    class CpuRuntime:
        preferred_batch_size = None

        def __call__(self, batch):
            return batch

    cpu = CpuRuntime()
    assert segmenter_for(cpu, None) == (segment_volume, cpu, 4)
    assert segmenter_for(cpu, 7)[2] == 7

    class GpuRuntime:
        device, preferred_batch_size = "cpu", 16

        def run_device(self, batch):
            return batch

    gpu = GpuRuntime()
    segment, network, batch = segmenter_for(gpu, None)
    assert segment.func.__name__ == "segment_volume_device" and segment.keywords == {"device": "cpu"}
    assert network == gpu.run_device and batch == 16


def test_runtime_is_exited_when_the_work_fails():
    started, events, _ = _start({})
    with pytest.raises(ValueError):
        with started:
            raise ValueError("case failed")
    assert events == ["enter tensorrt", "exit tensorrt"]


def test_a_short_batch_is_padded_to_the_smallest_size_already_run_that_holds_it():
    """The tail of a volume (12 tiles after batches of 16) reuses the batch of 16: no second autotuning or graph."""
    from model.runtimes.cuda import padded_batch_size

    assert padded_batch_size(12, set()) == 12  # nothing run yet: its own size
    assert padded_batch_size(12, {16}) == 16
    assert padded_batch_size(3, {4, 16}) == 4  # the smallest that holds it
    assert padded_batch_size(16, {16}) == 16
    assert padded_batch_size(20, {16}) == 20  # a longer batch is never cut


def test_cudnn_autotuning_is_off_unless_asked_for(monkeypatch):
    """Off by default: on the H200 it cost a fresh process 1.4 s and gained nothing after (docs/benchmarks.md)."""
    from model.runtimes.cuda import cudnn_autotuning

    monkeypatch.delenv("TRUNKSEG_CUDNN_BENCHMARK", raising=False)
    assert cudnn_autotuning() is False
    monkeypatch.setenv("TRUNKSEG_CUDNN_BENCHMARK", "1")
    assert cudnn_autotuning() is True
    monkeypatch.setenv("TRUNKSEG_CUDNN_BENCHMARK", "0")
    assert cudnn_autotuning() is False


# --- on a GPU ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason=NO_CUDA_REASON)
def test_a_padded_short_batch_gives_what_it_gives_alone(demo_package):
    """Padding is per-sample safe (instance normalisation): the short batch's logits match running it unpadded."""
    import torch

    from model.runtimes.cuda import TorchCudaRunner

    full = torch.randn((4, 1, *demo_package.card.tile_size), device="cuda")
    with TorchCudaRunner(demo_package, precision="fp32", cuda_graphs=False) as alone, TorchCudaRunner(demo_package, precision="fp32") as padded:
        alone.pad_batches = False
        expected = alone.run_device(full[:3])
        padded.run_device(full)
        got = padded.run_device(full[:3])
        assert padded.sizes_run == {4} and list(padded.graphs) == [4] and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason=NO_CUDA_REASON)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_replay_what_eager_computes(demo_package, precision):
    import torch

    from model.runtimes.cuda import TorchCudaRunner

    batch = torch.randn((5, 1, *demo_package.card.tile_size), device="cuda")
    with TorchCudaRunner(demo_package, precision=precision, cuda_graphs=False) as eager, TorchCudaRunner(demo_package, precision=precision) as graphed:
        a = eager.run_device(batch)
        b1, b2 = graphed.run_device(batch), graphed.run_device(batch * 0.5)
        assert len(graphed.graphs) == 1
        torch.testing.assert_close(b1.float(), a.float(), rtol=1e-3, atol=1e-3 * float(a.abs().max()))
        assert not torch.equal(b1, b2)  # the clone survives the next replay


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason=NO_CUDA_REASON)
def test_torch_cuda_fp16_segments_like_fp32_onnxruntime(demo_package):
    from model.runtimes.cuda import TorchCudaRunner
    from model.runtimes.cpu import OnnxRuntimeRunner
    from model.segment import segment_volume
    from model.segment_torch import segment_volume_device
    from model.phantom import make_phantom

    phantom = make_phantom(5, size_xy=(512, 512), spacing_mm=(0.8, 0.8, 1.0), n_slices=24)
    with OnnxRuntimeRunner(demo_package, threads=2) as fp32:
        reference = segment_volume(phantom.ct_zyx, pixel_spacing_mm=(0.8, 0.8), card=demo_package.card, network=fp32, slice_spacing_mm=5.0)
    with TorchCudaRunner(demo_package, precision="fp16") as runner:
        got = segment_volume_device(phantom.ct_zyx, pixel_spacing_mm=(0.8, 0.8), card=demo_package.card, network=runner.run_device,
                                    device="cuda", slice_spacing_mm=5.0)
    labels = np.union1d(np.unique(reference), np.unique(got))
    dice = {v: 2 * np.sum((reference == v) & (got == v)) / (np.sum(reference == v) + np.sum(got == v)) for v in labels if v}
    assert min(dice.values()) >= 0.99, dice
