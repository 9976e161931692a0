"""Model packages (checksums, card checks) and the runtimes behind one callable interface."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from model.package import load_model_package
from model.runtimes.choice import choose_runtime, open_runtime
from model.runtimes.cpu import OnnxRuntimeRunner, OpenVinoRunner, TorchRunner
from common.errors import ModelPackageError, RuntimeUnavailableError
from tests.conftest import DEMO_MODEL
from model.phantom import make_annotated_slices


@pytest.fixture()
def package_copy(tmp_path):
    return shutil.copytree(DEMO_MODEL, tmp_path / "package")


@pytest.fixture(scope="module")
def phantom_tiles(demo_package):
    card = demo_package.card
    ct, _ = make_annotated_slices(404, size_xy=card.tile_size[::-1], pixel_spacing_mm=card.pixel_spacing_mm[0])
    n = card.normalization
    return ((np.clip(ct[::4], n.clip_low, n.clip_high) - n.mean) / n.std).astype(np.float32)[:, None]


def test_demo_package_loads_and_describes_itself(demo_package):
    card = demo_package.card
    assert card.num_classes == 23 and card.channel_labels[0] == 0
    assert card.frame == "LPS" and not card.mirroring
    assert set(card.files) == {"weights", "onnx"}
    assert card.metrics, "the demo card must carry its held-out Dice"


def test_altered_file_fails_its_checksum(package_copy):
    onnx = package_copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="SHA-256"):
        load_model_package(package_copy)


def test_missing_file_and_foreign_labels_are_refused(package_copy):
    (package_copy / "weights.safetensors").unlink()
    with pytest.raises(ModelPackageError, match="missing"):
        load_model_package(package_copy)
    card = json.loads((package_copy / "model.json").read_text())
    card["channel_labels"][5] = 99
    (package_copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="not canonical"):
        load_model_package(package_copy, verify=False)


def test_file_paths_may_not_leave_the_package(package_copy):
    card = json.loads((package_copy / "model.json").read_text())
    card["files"]["onnx"]["path"] = "../../etc/passwd"
    (package_copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="leaves the package"):
        load_model_package(package_copy, verify=False)


def _set(card: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        card = card[key]
    if value is _DELETE:
        del card[path[-1]]
    else:
        card[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    (("files", "onnx", "path"), _DELETE, "file entry"),
    (("files", "onnx"), "model.onnx", "file entry"),
    (("files", "onnx", "sha256"), "not-a-checksum", "64 lower-case hex"),
    (("files",), ["model.onnx"], "files must be an object"),
    (("precision_agreement", "openvino-bf16", "min_dice"), _DELETE, "missing 'min_dice'"),
    (("precision_agreement", "openvino-bf16", "holds"), "yes", "'holds': true|false"),
    (("precision_agreement", "openvino-bf16", "voxel_agreement"), 1.5, "fractions in"),
    (("precision_agreement", "openvino-bf16"), True, "must be an object"),
    (("normalization", "std"), _DELETE, "std"),
    (("normalization", "mean"), "zero", "could not convert"),
    (("channel_labels",), [], "channel_labels must start with background"),
    (("name",), _DELETE, "missing 'name'"),
    (("arch_kwargs",), [1, 2], "arch_kwargs"),
])
def test_a_malformed_card_substructure_is_a_model_package_error_naming_the_card(package_copy, path, value, message):
    card = json.loads((package_copy / "model.json").read_text())
    _set(card, path, value)
    (package_copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match=message) as raised:
        load_model_package(package_copy, verify=False)
    assert str(package_copy / "model.json") in str(raised.value)


def test_a_card_that_is_not_an_object_is_refused(package_copy):
    (package_copy / "model.json").write_text("[1, 2]")
    with pytest.raises(ModelPackageError, match="format_version|JSON object"):
        load_model_package(package_copy)


def test_the_typed_card_writes_back_the_json_it_read(demo_package):
    """Typed entries (PackageFile, PrecisionRecord) round-trip: the demo card's JSON is unchanged, field for field."""
    on_disk = json.loads((demo_package.folder / "model.json").read_text())
    written = {"format_version": on_disk["format_version"], **demo_package.card.to_dict()}
    assert json.loads(json.dumps(written)) == on_disk
    record = demo_package.card.precision_agreement["openvino-bf16"]
    assert isinstance(record.holds, bool) and 0 <= record.min_dice <= 1 and "per_volume" in record.details
    assert len(demo_package.card.files["onnx"].sha256) == 64


def test_not_a_package_is_a_clear_error(tmp_path):
    with pytest.raises(ModelPackageError, match="no model.json"):
        load_model_package(tmp_path)


def test_onnxruntime_and_torch_agree_on_the_demo_model(demo_package, phantom_tiles):
    with OnnxRuntimeRunner(demo_package, threads=2) as ort, TorchRunner(demo_package, device="cpu") as torch_runner:
        a, b = ort(phantom_tiles), torch_runner(phantom_tiles)
    assert a.shape == (len(phantom_tiles), 23, *demo_package.card.tile_size)
    np.testing.assert_allclose(a, b, atol=2e-3 * np.abs(b).max())
    assert np.mean(a.argmax(1) == b.argmax(1)) > 0.9999


@pytest.mark.parametrize("runner_class", [OnnxRuntimeRunner, OpenVinoRunner, TorchRunner])
def test_runtimes_check_their_named_input(demo_package, runner_class):
    tile = demo_package.card.tile_size
    with runner_class(demo_package) as runner:
        with pytest.raises(TypeError, match="float32"):
            runner(np.zeros((1, 1, *tile), np.float64))
        with pytest.raises(ValueError, match="image"):
            runner(np.zeros((1, 1, tile[0], tile[1] + 1), np.float32))


def test_openvino_writes_logits_into_the_callers_buffer_and_never_into_it_afterwards(demo_package, phantom_tiles):
    tiles = phantom_tiles[:2]
    with OpenVinoRunner(demo_package, threads=2) as runner:
        expected = runner(tiles)
        lent = np.full((2, 23, *demo_package.card.tile_size), np.nan, np.float32)
        runner.infer_into(tiles, lent)
        np.testing.assert_array_equal(lent, expected)  # the same request, the same numbers
        kept = lent.copy()
        again = runner(tiles[::-1].copy())  # a later plain call must not write through the lent array
        np.testing.assert_array_equal(lent, kept)
        np.testing.assert_array_equal(again, expected[::-1])
        with pytest.raises(ValueError, match="buffer"):
            runner.infer_into(tiles, np.empty((1, 23, *demo_package.card.tile_size), np.float32))
        with pytest.raises(TypeError, match="C-contiguous"):
            runner.infer_into(tiles, np.empty((2, 23, *demo_package.card.tile_size), np.float32).transpose(0, 1, 3, 2))


def test_runtime_choice_is_explained():
    choice = choose_runtime("auto")
    assert choice.name in ("openvino", "onnxruntime", "torch-cuda") and choice.reason
    assert choose_runtime("onnxruntime").name == "onnxruntime"
    with pytest.raises(RuntimeUnavailableError, match="tensorrt"):
        choose_runtime("tensorrt")
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime"):
        choose_runtime("tpu")


def test_open_runtime_gives_the_chosen_runner(demo_package):
    assert isinstance(open_runtime(choose_runtime("onnxruntime"), demo_package), OnnxRuntimeRunner)
    assert isinstance(open_runtime(choose_runtime("torch"), demo_package), TorchRunner)


def test_network_builder_refuses_layers_outside_the_allow_list():
    from model.network import build_network, plain_unet_kwargs

    kwargs = plain_unet_kwargs(features_per_stage=[4, 8], strides=[1, 2])
    kwargs["nonlin"] = "os.system"
    with pytest.raises(ModelPackageError, match="not an allowed layer"):
        build_network(network_class_name="dynamic_network_architectures.architectures.unet.PlainConvUNet", arch_kwargs=kwargs, input_channels=1, num_classes=3)
    with pytest.raises(ModelPackageError, match="unknown network class"):
        build_network(network_class_name="evil.Net", arch_kwargs={}, input_channels=1, num_classes=3)
