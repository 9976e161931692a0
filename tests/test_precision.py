"""CPU precision modes (bf16, int8) and the fast numerics around the network, on the TRAINED demo model.

Agreement is always measured against the fp32 labels of the same weights (ONNX Runtime fp32) through
the real segmenter; never on random weights (a random network's near-ties say nothing of a model).
The nnU-Net-imported model's bf16 agreement is tested in test_nnunet_interop.py, which trains it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

import process
from model.package import load_model_package
from model.precision import (
    agreement_of,
    choose_precision,
    cpu_has_native_bf16,
    dice_per_label,
    measure_agreement,
    open_runner,
    phantom_volumes,
    record_agreement,
    speed_order,
)
from preprocess.resample import argmax_channels, resample_slices
from tests.conftest import DEMO_MODEL, write_volume
from training.phantom import make_phantom

openvino = pytest.importorskip("openvino", reason="OpenVINO is the CPU runtime of the reduced precisions")
needs_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AMX or AVX512-BF16)")


@pytest.fixture(scope="module")
def volumes(demo_package):
    return phantom_volumes(demo_package.card)


@pytest.fixture(scope="module")
def int8_package(demo_package, tmp_path_factory):
    from model.quantize import quantize_package

    folder = tmp_path_factory.mktemp("int8") / "pkg"
    shutil.copytree(DEMO_MODEL, folder)
    quantize_package(folder)
    return load_model_package(folder)


# --- the numerics around the network: the same answers, faster -------------------------------------------

@pytest.mark.parametrize("shape, target, order", [((3, 47, 61), (70, 41), 3), ((2, 512, 512), (499, 499), 3), ((2, 23, 31), (50, 17), 1)])
def test_matrix_resampling_is_scipys_zoom(shape, target, order):
    stack = ndimage.gaussian_filter(np.random.default_rng(0).normal(0, 300, shape), (0, 2, 2)).astype(np.float32)
    expected = ndimage.zoom(stack, (1, target[0] / shape[1], target[1] / shape[2]), order=order, mode="nearest", grid_mode=True)
    got = resample_slices(stack, target, order=order)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6 * np.abs(stack).max())


def test_plane_argmax_is_numpys_argmax_ties_included():
    logits = np.random.default_rng(1).normal(size=(2, 7, 30, 20)).astype(np.float32)
    logits[:, 4] = logits[:, 2]  # exact ties: the first channel wins, as in np.argmax
    logits[0, :, :5] = 0.0
    np.testing.assert_array_equal(argmax_channels(logits), np.argmax(logits, axis=1))


def test_dice_per_label_against_a_direct_count():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 4, 5000).astype(np.uint8), rng.integers(0, 4, 5000).astype(np.uint8)
    direct = {v: 2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in (1, 2, 3)}
    assert dice_per_label(a, b, min_voxels=1) == pytest.approx(direct)


# --- which precision runs ------------------------------------------------------------------------------

def _with_record(card, key, holds, min_dice=0.995):
    return replace(card, precision_agreement={key: {"holds": holds, "voxel_agreement": 0.9999, "min_dice": min_dice}})


def test_auto_precision_takes_only_a_mode_recorded_as_agreeing(demo_package):
    card = replace(demo_package.card, precision_agreement={})
    assert choose_precision("auto", runtime="openvino", card=card).name == "fp32"
    assert choose_precision("auto", runtime="openvino", card=_with_record(card, "openvino-bf16", holds=False)).name == "fp32"
    held = choose_precision("auto", runtime="openvino", card=_with_record(card, "openvino-bf16", holds=True))
    assert held.name == ("bf16" if cpu_has_native_bf16() else "fp32") and held.verified
    # a record for another runtime does not carry over
    assert choose_precision("auto", runtime="onnxruntime", card=_with_record(card, "openvino-bf16", holds=True)).name == "fp32"
    # int8 needs its file in the package as well as a record
    assert choose_precision("auto", runtime="openvino", card=_with_record(card, "openvino-int8", holds=True)).name == "fp32"


def test_auto_takes_the_fastest_holding_mode_for_this_kind_of_cpu(demo_package, monkeypatch):
    import model.precision as precision

    keys = ("openvino-bf16", "openvino-int8", "openvino-int8+bf16")
    records = {key: {"holds": True, "voxel_agreement": 0.9999, "min_dice": 0.995} for key in keys}
    card = replace(demo_package.card, precision_agreement=records,
                   files={**demo_package.card.files, "onnx_int8": {"path": "model.int8.onnx", "sha256": "0" * 64}})

    def holding(*held):
        return replace(card, precision_agreement={key: {**records[key], "holds": key in held} for key in keys})

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: True)  # AMX: bf16 is the fastest (dev-2c)
    assert choose_precision("auto", runtime="openvino", card=card).name == "bf16"
    assert choose_precision("auto", runtime="openvino", card=holding("openvino-int8", "openvino-int8+bf16")).name == "int8+bf16"
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)  # AVX512-BF16 without AMX: int8+bf16, int8, bf16 (dev-2c-amd)
    assert choose_precision("auto", runtime="openvino", card=card).name == "int8+bf16"
    assert choose_precision("auto", runtime="openvino", card=holding("openvino-bf16", "openvino-int8")).name == "int8"
    assert choose_precision("auto", runtime="openvino", card=holding("openvino-bf16")).name == "bf16"  # the faster ones do not hold
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # no native bf16: of these only int8 can run
    assert choose_precision("auto", runtime="openvino", card=card).name == "int8"
    assert choose_precision("auto", runtime="openvino", card=holding("openvino-bf16", "openvino-int8+bf16")).name == "fp32"


def test_an_explicit_precision_runs_and_says_whether_it_was_verified(demo_package):
    card = replace(demo_package.card, precision_agreement={})
    choice = choose_precision("bf16", runtime="openvino", card=card)
    assert choice.name == "bf16" and not choice.verified and "no recorded agreement" in choice.reason
    choice = choose_precision("bf16", runtime="openvino", card=_with_record(card, "openvino-bf16", holds=False))
    assert not choice.verified and "does NOT agree" in choice.reason


def test_unavailable_precisions_are_errors_not_fallbacks(demo_package):
    from model.runtime import OnnxRuntimeRunner
    from preprocess.errors import RuntimeUnavailableError

    with pytest.raises(RuntimeUnavailableError, match="bf16"):
        OnnxRuntimeRunner(demo_package, precision="bf16")
    for key in ("openvino-int8", "openvino-int8+bf16"):  # no int8 export in this package
        with pytest.raises(Exception, match="onnx_int8"):
            with open_runner(key, demo_package, threads=1):
                pass
    with pytest.raises(RuntimeUnavailableError, match="int8\\+bf16"):
        OnnxRuntimeRunner(demo_package, precision="int8+bf16")


# --- agreement on the trained demo model ----------------------------------------------------------------

@needs_bf16
def test_bf16_on_the_trained_demo_agrees_with_fp32_on_phantoms(demo_package, volumes):
    record = measure_agreement(demo_package, volumes, ["openvino-bf16"], threads=2)["openvino-bf16"]
    print(f"demo, openvino-bf16 vs fp32 on phantoms: {record}")
    assert record["holds"] and record["labels_compared"] >= 20
    assert record["voxel_agreement"] >= 0.9999 and record["min_dice"] >= 0.995


def test_the_demo_card_records_what_was_measured(demo_package):
    record = demo_package.card.precision_agreement["openvino-bf16"]
    assert record["reference"] == "onnxruntime-fp32" and "example_ct" in record["data"]
    # recorded as not holding: on real CT (which it does not know) the phantom model's labels are near-ties
    assert record["holds"] == (record["voxel_agreement"] >= 0.999 and record["min_dice"] >= 0.99)
    assert all(v["min_dice"] >= 0.995 for k, v in record["per_volume"].items() if k.startswith("phantom"))


def test_int8_export_keeps_the_logits_layer_in_float_and_is_measured(int8_package, volumes):
    import onnx

    graph = onnx.load(str(int8_package.path_of("onnx_int8"))).graph
    produced_by = {o: n for n in graph.node for o in n.output}
    last = produced_by[graph.output[0].name]
    assert last.op_type == "Conv" and last.input[1] in {i.name for i in graph.initializer}  # float weights, no DequantizeLinear
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 20  # the other convolutions are int8
    keys = ["openvino-int8", "onnxruntime-int8"] + (["openvino-int8+bf16"] if cpu_has_native_bf16() else [])
    records = measure_agreement(int8_package, volumes, keys, threads=2)
    print(f"demo, int8 vs fp32 on phantoms: {records}")
    for record in records.values():  # close to fp32 (whether within the bar is the record's verdict)
        assert record["voxel_agreement"] >= 0.99 and record["min_dice"] >= 0.9
        assert record["holds"] == (record["voxel_agreement"] >= 0.999 and record["min_dice"] >= 0.99)
    record_agreement(int8_package.folder, records)
    card = load_model_package(int8_package.folder).card
    assert not card.precision_agreement["openvino-bf16"]["holds"]  # the demo's bf16 record (see above)
    expected = next((mode for mode in speed_order("openvino") if f"openvino-{mode}" in records and records[f"openvino-{mode}"]["holds"]), "fp32")
    assert choose_precision("auto", runtime="openvino", card=card).name == expected


def test_openvino_int8_runs_the_int8_graph_in_f32_near_fp32(int8_package, volumes):
    """Needs no bf16 (the int8+bf16 variant below does): the int8 file runs, with f32 between its convolutions."""
    from model.quantize import calibration_tiles

    tiles = calibration_tiles(int8_package.card, volumes[:1], max_tiles=2)  # real network inputs (a phantom's slices)
    logits = {}
    for key in ("openvino-fp32", "openvino-int8"):
        with open_runner(key, int8_package, threads=2) as runner:
            logits[key] = runner(tiles)
            assert runner.compile_config()["INFERENCE_PRECISION_HINT"] == "f32"
    fp32, int8 = logits["openvino-fp32"], logits["openvino-int8"]
    assert not np.array_equal(int8, fp32)  # the int8 graph ran, not the float one
    assert float(np.abs(int8 - fp32).mean()) < 0.02 / 1.5 * float(np.abs(fp32).max())  # the bound the bf16 test below implies
    assert (int8.argmax(1) == fp32.argmax(1)).mean() > 0.999


@needs_bf16
def test_int8_bf16_runs_the_int8_graph_with_bf16_between_its_convolutions(int8_package, volumes):
    from model.quantize import calibration_tiles

    tiles = calibration_tiles(int8_package.card, volumes[:1], max_tiles=2)  # real network inputs (a phantom's slices)
    logits = {}
    for key in ("openvino-fp32", "openvino-int8", "openvino-int8+bf16", "openvino-bf16"):
        with open_runner(key, int8_package, threads=2) as runner:
            logits[key] = runner(tiles)
            assert runner.compile_config()["INFERENCE_PRECISION_HINT"] == ("bf16" if key.endswith("bf16") else "f32")
    # not int8 again (the hint took effect), not bf16 on the float graph (it runs the int8 file)
    assert not np.array_equal(logits["openvino-int8+bf16"], logits["openvino-int8"])
    assert not np.array_equal(logits["openvino-int8+bf16"], logits["openvino-bf16"])
    # about as far from fp32 as int8 is (measured: mean |difference| 0.145 against int8's 0.131, logits up to 27)
    fp32 = logits["openvino-fp32"]
    error = {key: float(np.abs(value - fp32).mean()) for key, value in logits.items()}
    assert error["openvino-int8+bf16"] < 1.5 * error["openvino-int8"] < 0.02 * float(np.abs(fp32).max())
    assert (logits["openvino-int8+bf16"].argmax(1) == fp32.argmax(1)).mean() > 0.999


@pytest.mark.parametrize("key", ["openvino-fp32", pytest.param("openvino-bf16", marks=needs_bf16), "onnxruntime-fp32", "openvino-int8",
                                 pytest.param("openvino-int8+bf16", marks=needs_bf16), "onnxruntime-int8"])
def test_runs_are_identical_from_run_to_run(demo_package, key, request):
    package = request.getfixturevalue("int8_package") if "int8" in key else demo_package
    tiles = np.random.default_rng(3).normal(size=(2, 1, *package.card.tile_size)).astype(np.float32)
    outputs = []
    for _ in range(2):
        with open_runner(key, package, threads=2) as runner:
            outputs.append(runner(tiles))
            outputs.append(runner(tiles))
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)


# --- process.py: the option and its report ---------------------------------------------------------------

def _run_process_with_record(tmp_path, name: str, precision: str, record: dict) -> tuple[dict, bytes]:
    """process.py on a small phantom with the demo package whose card records `record`; (runtime entry, mask bytes)."""
    if not (tmp_path / "in" / "p.nii.gz").exists():
        phantom = make_phantom(31, size_xy=(200, 180), spacing_mm=(1.6, 1.6, 6.0), n_slices=6)
        write_volume(phantom.ct_zyx, tmp_path / "in" / "p.nii.gz", spacing=phantom.geometry.spacing_mm)
    package = tmp_path / f"pkg-{name}"
    shutil.copytree(DEMO_MODEL, package)
    record_agreement(package, {"openvino-bf16": record})
    out = tmp_path / name
    assert process.main(["--input", str(tmp_path / "in"), "--output", str(out), "--model", str(package),
                         "--runtime", "openvino", "--precision", precision, "--threads", "2"]) == 0
    runtime = json.loads((out / "results.json").read_text())["runtime"]
    assert runtime["name"] == "openvino" and runtime["precision_reason"]
    return runtime, (out / "images" / process.OUTPUT_SLUG / "p.mha").read_bytes()


def test_process_runs_fp32_when_the_card_records_no_faster_mode_holding(tmp_path):
    """Needs no bf16: with bf16 recorded as not holding (or no bf16 on this CPU), auto runs fp32 and says it is verified."""
    runtime, _ = _run_process_with_record(tmp_path, "auto-unrecorded", "auto", {"holds": False, "voxel_agreement": 0.99, "min_dice": 0.9})
    assert runtime["precision"] == "fp32" and runtime["precision_verified"]


@needs_bf16
def test_process_reports_the_bf16_it_ran_and_whether_the_card_verified_it(tmp_path):
    runtime, explicit = _run_process_with_record(tmp_path, "bf16", "bf16", {"holds": False, "voxel_agreement": 0.99, "min_dice": 0.9})
    assert runtime["precision"] == "bf16" and not runtime["precision_verified"]
    runtime, recorded = _run_process_with_record(tmp_path, "auto-recorded", "auto", {"holds": True, "voxel_agreement": 1.0, "min_dice": 1.0})
    assert runtime["precision"] == "bf16" and runtime["precision_verified"]
    assert explicit == recorded  # the same settings give the same mask, byte for byte

def test_agreement_of_counts_every_volume():
    a = [np.zeros((2, 10, 10), np.uint8), np.ones((1, 10, 10), np.uint8)]
    b = [np.zeros((2, 10, 10), np.uint8), np.ones((1, 10, 10), np.uint8)]
    b[1][0, 0, :5] = 0
    record = agreement_of(a, b)
    assert record["voxel_agreement"] == pytest.approx(1 - 5 / 300) and not record["holds"]
