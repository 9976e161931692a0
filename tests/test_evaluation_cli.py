"""The evaluation tool end to end: reading, pairing, annotation rules, grids, outputs, and bad input.

Tiny seeded volumes written to tmp_path; scores checked against grand-challenge-metrics (Dice) where
a number matters. Bad input: one "error:" line on stderr, a non-zero exit, and no metrics.json.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from evaluation.cli import main
from evaluation.labels import canonical_label_set, load_label_set, with_ignore
from evaluation.volumes import read_annotated_slices, read_prediction_slices
from common.labels import IGNORE, LABELS, LEVELS
from tests.conftest import REPO, write_volume

gc_stats = pytest.importorskip("grand_challenge_metrics.stats", reason="oracle grand-challenge-metrics not installed (requirements/evaluation-test.txt)")

SPACING = (0.9, 1.1, 4.0)
ORIGIN = (-30.0, 12.5, 100.0)
SHAPE = (16, 40, 36)  # z, y, x
ANNOTATED = (2, 7, 8, 13)


def dense_labels(seed: int, shape=SHAPE, n_labels: int = 22) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), (1, 2.5, 2.5))
    labels = np.digitize(field, np.quantile(field, np.linspace(0.3, 0.97, n_labels + 1)))
    labels[labels > n_labels] = 0
    return labels.astype(np.uint8)


def sparse(dense: np.ndarray, slices=ANNOTATED) -> np.ndarray:
    out = np.full_like(dense, IGNORE)
    out[list(slices)] = dense[list(slices)]
    return out


def perturb(dense: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.roll(dense, int(rng.integers(1, 3)), axis=2)
    out[rng.random(dense.shape) < 0.02] = 0
    return out


def write_case(folder: Path, name: str, array: np.ndarray, suffix: str = ".mha", **geometry) -> Path:
    geometry = {"spacing": SPACING, "origin": ORIGIN, **geometry}
    return write_volume(array, folder / f"{name}{suffix}", **geometry)


def make_dataset(tmp_path: Path, n: int = 3, *, truth_suffix=".nii.gz", prediction_suffix=".mha"):
    truth_dir, prediction_dir = tmp_path / "gt", tmp_path / "pred"
    cases = {}
    for i in range(n):
        dense = dense_labels(i)
        prediction = perturb(dense, 50 + i)
        write_case(truth_dir, f"case_{i}", sparse(dense), truth_suffix)
        write_case(prediction_dir, f"case_{i}", prediction, prediction_suffix)
        cases[f"case_{i}"] = (dense, prediction)
    return truth_dir, prediction_dir, cases


def run_main(args, capsys):
    code = main([str(a) for a in args] + ["--workers", "1", "--no-figure"])
    captured = capsys.readouterr()
    return code, captured.err


def oracle_dice(truth: np.ndarray, prediction: np.ndarray, n_labels: int = 22) -> np.ndarray:
    confusion = gc_stats.calculate_confusion_matrix(truth.ravel(), prediction.ravel(), list(range(n_labels + 1)))
    with np.errstate(invalid="ignore"):
        return gc_stats.dice_from_confusion_matrix(confusion)[1:]


def assert_failed_cleanly(code: int, err: str, output: Path, *, expected_code: int = 3, says: str = "") -> None:
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert says.lower() in lines[0].lower(), lines[0]
    assert not (output / "metrics.json").exists()
    assert not output.exists() or not list(output.iterdir()), "a failed run wrote files"


# --- end to end, local mode -----------------------------------------------------------------------


def test_local_run_scores_only_annotated_slices_and_matches_oracle_dice(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path)
    output = tmp_path / "out"
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", output], capsys)
    assert code == 0, err
    metrics = json.loads((output / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert [r["case_id"] for r in metrics["results"]] == ["case_0", "case_1", "case_2"]
    names = list(LABELS)
    for result in metrics["results"]:
        dense, prediction = cases[result["case_id"]]
        expected = oracle_dice(dense[list(ANNOTATED)], prediction[list(ANNOTATED)])
        assert [s["slice_index"] for s in result["slices"]] == list(ANNOTATED)
        assert result["annotation"] == "ignore-value" and result["grid"] == "same"
        for k, name in enumerate(names):
            if np.isnan(expected[k]):
                assert name in result["not_scored"]
            else:
                assert result["muscles"][name]["dice"] == pytest.approx(expected[k], abs=2e-6)
    aggregates = metrics["aggregates"]
    per_case_means = [r["mean"]["dice"] for r in metrics["results"]]
    assert aggregates["dice"]["overall"]["mean"] == pytest.approx(np.mean(per_case_means), abs=1e-6)
    assert aggregates["dice"]["overall"]["n"] == 3
    overlap = sum(r["muscles"][names[0]]["overlap_px"] for r in metrics["results"] if names[0] in r["muscles"])
    total = sum(r["muscles"][names[0]]["truth_px"] + r["muscles"][names[0]]["prediction_px"] for r in metrics["results"] if names[0] in r["muscles"])
    assert aggregates["pooled_dice"]["per_muscle"][names[0]] == pytest.approx(2 * overlap / total, abs=1e-6)
    assert "not scored" in metrics["policy"]["absent_in_both"]
    rows = (output / "metrics_per_slice.csv").read_text().strip().splitlines()
    assert rows[0].startswith("case_id,slice_index,z_mm,level,muscle")
    assert len(rows) - 1 == sum(r["muscles"][m]["n_slices"] for r in metrics["results"] for m in r["muscles"])


def test_figure_is_a_png_with_dice_per_muscle_and_by_level(tmp_path, capsys):
    truth_dir, prediction_dir, _ = make_dataset(tmp_path, n=2)
    (truth_dir / "levels.json").write_text(json.dumps({f"case_{i}": {"T4": 13, "T5": 8, "L1": 7, "L4": 2} for i in range(2)}))
    output = tmp_path / "out"
    code = main(["--predictions", str(prediction_dir), "--ground-truth", str(truth_dir), "--output", str(output), "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    png = (output / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    metrics = json.loads((output / "metrics.json").read_text())
    assert list(metrics["aggregates"]["by_level"]) == ["T4", "T5", "L1", "L4"]
    assert metrics["results"][0]["slices"][0]["level"] == "L4"
    assert "L1" in metrics["results"][0]["levels"]


def test_python_dash_m_evaluation_runs_in_parallel_workers(tmp_path):
    truth_dir, prediction_dir, _ = make_dataset(tmp_path, n=2)
    output = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "evaluation", "--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", output, "--workers", "2", "--no-figure"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads((output / "metrics.json").read_text())["results"]) == 2


# --- what counts as annotated -----------------------------------------------------------------------


def test_without_ignore_value_slices_with_foreground_are_annotated(tmp_path):
    dense = dense_labels(5)
    truth = np.zeros_like(dense)
    truth[[3, 9]] = dense[[3, 9]]
    path = write_case(tmp_path, "t", truth)
    slices = read_annotated_slices(path, canonical_label_set())
    assert slices.mode == "foreground-slices"
    assert slices.slice_indices.tolist() == [3, 9]
    assert (slices.codes_syx != 23).all()  # whole slices annotated


def test_ignore_value_marks_unannotated_voxels_inside_a_slice(tmp_path, capsys):
    dense = dense_labels(6)
    truth = sparse(dense, (4,))
    truth[4, :, :10] = IGNORE  # part of the slice left undrawn
    prediction = dense.copy()
    prediction[4, :, :10] = 7  # nonsense where nobody drew: must not count
    write_case(tmp_path / "gt", "c", truth)
    write_case(tmp_path / "pred", "c", prediction)
    code, err = run_main(["--predictions", tmp_path / "pred", "--ground-truth", tmp_path / "gt", "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())["results"][0]
    assert all(m["dice"] == 1.0 and m["nsd"] == 1.0 for m in result["muscles"].values())


def test_nnunet_dataset_json_ignore_label_is_honoured(tmp_path, capsys):
    dense = dense_labels(8, n_labels=3)
    truth = np.full_like(dense, 4)  # nnU-Net's ignore label: the highest value
    truth[[5, 11]] = dense[[5, 11]]
    write_case(tmp_path / "gt", "c", truth)
    write_case(tmp_path / "pred", "c", dense)
    labels = {"background": 0, "a": 1, "b": 2, "c": 3, "never_drawn": 5, "ignore": 4}
    (tmp_path / "gt" / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".mha"}))
    label_set = load_label_set(tmp_path / "gt" / "dataset.json")
    assert label_set.ignore == 4 and label_set.names == ("a", "b", "c", "never_drawn")
    code, err = run_main(["--predictions", tmp_path / "pred", "--ground-truth", tmp_path / "gt", "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["config"]["labels"]["ignore"] == 4
    assert [s["slice_index"] for s in metrics["results"][0]["slices"]] == [5, 11]
    # a label absent from ground truth and prediction everywhere: not scored, n = 0, nulls
    assert metrics["results"][0]["not_scored"] == ["never_drawn"]
    assert metrics["aggregates"]["dice"]["per_muscle"]["never_drawn"] == {"mean": None, "std": None, "median": None, "p05": None, "p95": None, "n": 0}
    assert metrics["aggregates"]["pooled_dice"]["per_muscle"]["never_drawn"] is None


# --- reading: partial reads equal full reads; grids -------------------------------------------------


@pytest.mark.parametrize("suffix,compress,how", [(".mha", True, "full"), (".mha", False, "slices"), (".nii.gz", True, "slices"), (".nii", False, "slices"), (".nrrd", True, "full")])
def test_partial_reads_return_the_same_voxels_as_a_full_read(tmp_path, suffix, compress, how):
    dense = dense_labels(9)
    truth_path = write_case(tmp_path, "t", sparse(dense))
    prediction_path = tmp_path / f"p{suffix}"
    image = sitk.GetImageFromArray(perturb(dense, 1))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(prediction_path), useCompression=compress)
    label_set = canonical_label_set()
    truth = read_annotated_slices(truth_path, label_set)
    partial = read_prediction_slices(prediction_path, truth, label_set, case_id="c")
    full = read_prediction_slices(prediction_path, truth, label_set, case_id="c", strategy="full")
    assert partial.read == how and full.read == "full"
    np.testing.assert_array_equal(partial.codes_syx, full.codes_syx)
    np.testing.assert_array_equal(partial.codes_syx, perturb(dense, 1)[list(ANNOTATED)])


def test_prediction_on_a_padded_grid_is_resampled_to_the_same_scores(tmp_path, capsys):
    dense = dense_labels(10)
    prediction = perturb(dense, 2)
    write_case(tmp_path / "gt", "c", sparse(dense))
    write_case(tmp_path / "same", "c", prediction)
    padded = np.pad(prediction, ((2, 1), (3, 0), (0, 4)))  # more slices, rows and columns; origin moved to match
    shifted_origin = (ORIGIN[0], ORIGIN[1] - 3 * SPACING[1], ORIGIN[2] - 2 * SPACING[2])
    write_case(tmp_path / "padded", "c", padded, origin=shifted_origin)
    outputs = {}
    for variant in ("same", "padded"):
        code, err = run_main(["--predictions", tmp_path / variant, "--ground-truth", tmp_path / "gt", "--output", tmp_path / f"out-{variant}"], capsys)
        assert code == 0, err
        outputs[variant] = json.loads((tmp_path / f"out-{variant}" / "metrics.json").read_text())["results"][0]
    assert outputs["same"]["grid"] == "same" and outputs["padded"]["grid"] == "resampled"
    assert outputs["padded"]["field_of_view_coverage"] == 1.0
    assert outputs["padded"]["muscles"] == outputs["same"]["muscles"]


def test_volume_stored_with_another_axis_order_gives_the_same_scores(tmp_path, capsys):
    from preprocess.geometry import Geometry
    from tests.conftest import store_in_frame

    dense = dense_labels(11)
    prediction = perturb(dense, 3)
    geometry = Geometry(size_xyz=SHAPE[::-1], spacing_mm=SPACING, origin_mm=ORIGIN, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_case(tmp_path / "gt", "c", sparse(dense))
    write_case(tmp_path / "pred", "c", prediction)
    for folder, array in (("gt-spl", sparse(dense)), ("pred-spl", prediction)):  # axial axis stored first (x in ITK)
        stored, kwargs = store_in_frame(array, geometry, "SPL")
        write_volume(stored, tmp_path / folder / "c.mha", **kwargs)
    results = {}
    for tag, truth_dir, prediction_dir in (("lps", "gt", "pred"), ("spl", "gt-spl", "pred-spl"), ("mixed", "gt", "pred-spl")):
        code, err = run_main(["--predictions", tmp_path / prediction_dir, "--ground-truth", tmp_path / truth_dir, "--output", tmp_path / tag], capsys)
        assert code == 0, err
        results[tag] = json.loads((tmp_path / tag / "metrics.json").read_text())["results"][0]
    assert results["mixed"]["grid"] == "resampled"
    for tag in ("spl", "mixed"):
        for name, values in results["lps"]["muscles"].items():
            assert results[tag]["muscles"][name]["dice"] == pytest.approx(values["dice"], abs=1e-6)
            assert results[tag]["muscles"][name]["hd95_mm"] == pytest.approx(values["hd95_mm"], abs=1e-6)


# --- Grand Challenge layout -------------------------------------------------------------------------


def gc_job(pk: str, image_name: str, output_pk: str) -> dict:
    return {
        "pk": pk,
        "inputs": [{"interface": {"slug": "ct-image", "kind": "Image", "super_kind": "Image", "relative_path": "images/ct"},
                    "image": {"pk": f"in-{pk}", "name": image_name}, "file": None, "value": None}],
        "outputs": [{"interface": {"slug": "muscle-segmentation", "kind": "Segmentation", "super_kind": "Image",
                                   "relative_path": "images/muscle-segmentation"},
                     "image": {"pk": output_pk, "name": "output.mha"}, "file": None, "value": None}],
        "status": "Succeeded",
        "started_at": "2026-01-01T00:00:00Z",
    }


def make_gc_input(tmp_path: Path, jobs: list[tuple[str, str, np.ndarray]]) -> Path:
    input_dir = tmp_path / "input"
    entries = []
    for pk, image_name, prediction in jobs:
        entries.append(gc_job(pk, image_name, f"out-{pk}"))
        write_case(input_dir / pk / "output" / "images" / "muscle-segmentation", f"out-{pk}", prediction)
    input_dir.mkdir(parents=True, exist_ok=True)
    (input_dir / "predictions.json").write_text(json.dumps(entries))
    return input_dir


def test_grand_challenge_jobs_pair_with_ground_truth_by_input_image_name_and_mapping(tmp_path, capsys):
    truth_dir, _, cases = make_dataset(tmp_path, n=2)
    (truth_dir / "mapping.json").write_text(json.dumps({"scan-17.mha": "case_1"}))
    input_dir = make_gc_input(tmp_path, [("job-b", "scan-17.mha", cases["case_1"][1]), ("job-a", "case_0.nii.gz", cases["case_0"][1])])
    output = tmp_path / "out"
    code, err = run_main(["--input", input_dir, "--ground-truth", truth_dir, "--output", output], capsys)
    assert code == 0, err
    metrics = json.loads((output / "metrics.json").read_text())
    assert [(r["case_id"], r["job_pk"], r["image_name"]) for r in metrics["results"]] == [("case_0", "job-a", "case_0.nii.gz"), ("case_1", "job-b", "scan-17.mha")]
    assert metrics["config"]["mode"] == "grand-challenge"


def test_local_mapping_csv_and_levels_csv_rename_and_place_slices(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=2)
    (prediction_dir / "case_1.mha").rename(prediction_dir / "scan B.mha")
    (truth_dir / "mapping.csv").write_text("name,case_id\nscan B.mha,case_1.nii.gz\n")
    (truth_dir / "levels.csv").write_text("case_id,slice_index,level\ncase_1,2,L4\ncase_1,7,L1\ncase_1,13,T12\n")
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    second = metrics["results"][1]
    assert second["case_id"] == "case_1" and second["prediction"].endswith("scan B.mha")
    assert [s["level"] for s in second["slices"]] == ["L4", "L1", None, "T12"]
    assert list(metrics["aggregates"]["by_level"]) == ["T12", "L1", "L4"]
    assert metrics["aggregates"]["by_level"]["L1"]["n_cases"] == 1
    rows = [line.split(",") for line in (tmp_path / "out" / "metrics_per_slice.csv").read_text().splitlines()[1:]]
    assert {r[3] for r in rows if r[0] == "case_1" and r[1] == "7"} == {"L1"}


def test_empty_predictions_json_is_an_error(tmp_path, capsys):
    truth_dir, _, _ = make_dataset(tmp_path, n=1)
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "predictions.json").write_text("[]")
    code, err = run_main(["--input", tmp_path / "input", "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="lists no algorithm jobs")


def test_two_jobs_for_one_case_are_duplicate_case_names(tmp_path, capsys):
    truth_dir, _, cases = make_dataset(tmp_path, n=1)
    input_dir = make_gc_input(tmp_path, [("j1", "case_0.mha", cases["case_0"][1]), ("j2", "case_0.nii.gz", cases["case_0"][1])])
    code, err = run_main(["--input", input_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="duplicate case name 'case_0'")


def test_duplicate_case_names_among_ground_truth_files_are_an_error(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=1)
    write_case(truth_dir, "case_0", sparse(cases["case_0"][0]), ".mha")  # beside case_0.nii.gz
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="duplicate case name 'case_0'")


def test_job_without_the_configured_output_slug_names_the_slugs_found(tmp_path, capsys):
    truth_dir, _, cases = make_dataset(tmp_path, n=1)
    input_dir = make_gc_input(tmp_path, [("j1", "case_0.mha", cases["case_0"][1])])
    code, err = run_main(["--input", input_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out", "--output-slug", "other"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="found: muscle-segmentation")


# --- missing predictions ------------------------------------------------------------------------------


def test_missing_prediction_fails_with_its_case_id_unless_allowed(tmp_path, capsys):
    truth_dir, prediction_dir, _ = make_dataset(tmp_path, n=3)
    (prediction_dir / "case_1.mha").unlink()
    output = tmp_path / "out"
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", output], capsys)
    assert_failed_cleanly(code, err, output, says="no prediction for 1 case(s) with ground truth: case_1")
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", output, "--allow-missing"], capsys)
    assert code == 0, err
    metrics = json.loads((output / "metrics.json").read_text())
    missing = [r for r in metrics["results"] if r["case_id"] == "case_1"][0]
    assert missing["status"] == "missing-prediction" and missing["prediction"] is None
    assert all(m["dice"] == 0.0 and m["nsd"] == 0.0 for m in missing["muscles"].values())
    assert metrics["aggregates"]["n_cases_missing_prediction"] == 1
    assert metrics["config"]["missing_predictions"] == ["case_1"]


# --- bad input ------------------------------------------------------------------------------------------


def test_truncated_ground_truth_is_a_clear_error(tmp_path, capsys):
    truth_dir, prediction_dir, _ = make_dataset(tmp_path, n=2)
    data = (truth_dir / "case_1.nii.gz").read_bytes()
    (truth_dir / "case_1.nii.gz").write_bytes(data[: len(data) // 2])
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="case_1.nii.gz: corrupt or truncated gzip")
    assert "case_1:" in err


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
def test_truncated_or_garbage_prediction_is_a_clear_error(tmp_path, capsys, suffix):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=1, prediction_suffix=suffix)
    path = prediction_dir / f"case_0{suffix}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="truncated")
    path.write_bytes(b"not an image at all")
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says=str(path))


def test_prediction_label_values_outside_the_labels_file_are_an_error(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=1)
    prediction = cases["case_0"][1].copy()
    prediction[ANNOTATED[0], 0, 0] = 23
    write_case(prediction_dir, "case_0", prediction)
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="label values [23] are not in the labels file")


def test_ground_truth_label_values_outside_the_labels_file_are_an_error(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=1)
    truth = sparse(cases["case_0"][0])
    truth[ANNOTATED[1], 3, 3] = 100
    write_case(truth_dir, "case_0", truth, ".nii.gz")
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="label values [100]")


def test_prediction_that_does_not_overlap_the_ground_truth_is_an_error_naming_the_case(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=2)
    write_case(prediction_dir, "case_1", cases["case_1"][1], origin=(5000.0, 0.0, 0.0))
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="case_1: prediction")
    assert "does not overlap" in err


def test_two_dimensional_prediction_is_a_shape_error(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=1)
    image = sitk.GetImageFromArray(cases["case_0"][1][0])
    sitk.WriteImage(image, str(prediction_dir / "case_0.mha"))
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="expected a 3D prediction, got a 2D image")


def test_prediction_without_ground_truth_is_an_error(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=1)
    write_case(prediction_dir, "stray", cases["case_0"][1])
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", says="with no ground truth")


def test_bad_labels_file_and_options_are_configuration_errors(tmp_path, capsys):
    truth_dir, prediction_dir, _ = make_dataset(tmp_path, n=1)
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"labels": {"a": 1, "b": 1}}))
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out", "--labels", bad], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", expected_code=2, says="label values used twice")
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out", "--tolerance-mm", "-1"], capsys)
    assert_failed_cleanly(code, err, tmp_path / "out", expected_code=2, says="--tolerance-mm")
    with pytest.raises(Exception, match="also a label value"):
        with_ignore(canonical_label_set(), 5)


def test_unwritable_output_is_an_output_error_with_nothing_written(tmp_path, capsys):
    truth_dir, prediction_dir, _ = make_dataset(tmp_path, n=1)
    output = tmp_path / "out"
    output.write_text("a file where the output folder should be")
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", output], capsys)
    assert code == 5, err
    assert err.strip().splitlines()[-1].startswith("error:") and "not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "out", "pred"]


def test_vertebra_label_volume_gives_each_slice_its_majority_level(tmp_path, capsys):
    truth_dir, prediction_dir, cases = make_dataset(tmp_path, n=1)
    vertebrae = np.zeros(SHAPE, np.uint8)
    vertebrae[ANNOTATED[0], 5:10, 5:10] = LEVELS.index("L3") + 1
    vertebrae[ANNOTATED[0], 5:6, 5:7] = LEVELS.index("L2") + 1  # minority
    vertebrae[ANNOTATED[2], :4, :4] = LEVELS.index("T9") + 1
    write_case(truth_dir / "levels", "case_0", vertebrae)
    code, err = run_main(["--predictions", prediction_dir, "--ground-truth", truth_dir, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())["results"][0]
    assert [s["level"] for s in result["slices"]] == ["L3", None, "T9", None]


def test_gzip_helper_detects_what_sitk_misses(tmp_path):
    """The reason read_image's integrity check is used: SimpleITK reads a truncated .nii.gz silently."""
    dense = dense_labels(12)
    path = write_case(tmp_path, "x", dense, ".nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(EOFError):
        gzip.decompress(path.read_bytes())
    from evaluation.errors import InputError

    with pytest.raises(InputError, match="truncated"):
        read_annotated_slices(path, with_ignore(canonical_label_set(), IGNORE))
