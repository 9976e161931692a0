"""The evaluation on real masks: two TotalSegmentator versions of the same scan, sparsified to a few slices.

Ground truth: the v2 label map's autochthon (our erector spinae) and iliopsoas (our psoas major), kept on
five axial slices (the rest the ignore value). Prediction: the v1 masks (float64 0/1) as one float label
map. Checked against grand-challenge-metrics (Dice) and surface-distance (HD95, NSD) slice by slice.
Skipped with a reason when ../shared/data is absent (tests/conftest.py: ts_example).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from evaluation.cli import main
from tests.test_evaluation_metrics import gc_stats, oracle_pooled, oracle_surface

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TS_VALUES = {"autochthon_left": 86, "autochthon_right": 87, "iliopsoas_left": 88, "iliopsoas_right": 89}
OUR_NAMES = {"autochthon_left": "erector_spinae_left", "autochthon_right": "erector_spinae_right",
             "iliopsoas_left": "psoas_major_left", "iliopsoas_right": "psoas_major_right"}
TOLERANCE_MM = 2.0


@pytest.fixture(scope="module")
def real_case(ts_example, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    v2 = sitk.ReadImage(str(ts_example / "example_seg_fast_force_split.nii.gz"))
    v2_zyx = sitk.GetArrayFromImage(v2)
    kept = np.where(np.isin(v2_zyx, list(TS_VALUES.values())), v2_zyx, 0).astype(np.uint8)
    with_muscle = np.flatnonzero(kept.reshape(kept.shape[0], -1).any(axis=1))
    slices = with_muscle[np.linspace(0, with_muscle.size - 1, 5).round().astype(int)]
    truth_zyx = np.full_like(kept, 255)
    truth_zyx[slices] = kept[slices]
    truth = sitk.GetImageFromArray(truth_zyx)
    truth.CopyInformation(v2)
    (folder / "gt").mkdir()
    sitk.WriteImage(truth, str(folder / "gt" / "example.nii.gz"), useCompression=True)

    prediction_zyx = np.zeros(kept.shape, np.float64)
    v1_geometry = None
    for name, value in TS_VALUES.items():
        mask = sitk.ReadImage(str(ts_example / "v1-masks" / f"{name}.nii.gz"))
        v1_geometry = mask
        prediction_zyx[sitk.GetArrayFromImage(mask) > 0.5] = value
    prediction = sitk.GetImageFromArray(prediction_zyx)
    prediction.CopyInformation(v1_geometry)
    (folder / "pred").mkdir()
    sitk.WriteImage(prediction, str(folder / "pred" / "example.nii.gz"), useCompression=True)
    (folder / "labels.json").write_text(json.dumps({OUR_NAMES[n]: v for n, v in TS_VALUES.items()}))
    spacing_rc = (v2.GetSpacing()[1], v2.GetSpacing()[0])
    return folder, kept[slices], prediction_zyx[slices].astype(np.uint8), spacing_rc


def test_real_masks_score_like_the_oracles(real_case, capsys):
    folder, truth_slices, prediction_slices, spacing_rc = real_case
    code = main(["--predictions", str(folder / "pred"), "--ground-truth", str(folder / "gt"), "--output", str(folder / "out"),
                 "--labels", str(folder / "labels.json"), "--tolerance-mm", str(TOLERANCE_MM), "--workers", "1", "--no-figure"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((folder / "out" / "metrics.json").read_text())["results"][0]
    assert result["grid"] == "same" and result["n_annotated_slices"] == 5
    worst = float(np.hypot(truth_slices.shape[1] * spacing_rc[0], truth_slices.shape[2] * spacing_rc[1]))
    for ts_name, value in TS_VALUES.items():
        ours = result["muscles"][OUR_NAMES[ts_name]]
        confusion = gc_stats.calculate_confusion_matrix(truth_slices.ravel() == value, prediction_slices.ravel() == value, [False, True])
        assert ours["dice"] == pytest.approx(float(gc_stats.dice_from_confusion_matrix(confusion)[1]), abs=2e-6)
        parts = [oracle_surface(truth_slices[s] == value, prediction_slices[s] == value, spacing_rc)
                 for s in range(truth_slices.shape[0]) if (truth_slices[s] == value).any() or (prediction_slices[s] == value).any()]
        hd, nsd = oracle_pooled(parts, worst=worst, tolerance=TOLERANCE_MM)
        assert ours["hd95_mm"] == pytest.approx(hd, abs=1e-6)
        assert ours["nsd"] == pytest.approx(nsd, abs=1e-6)
        assert ours["dice"] > 0.8, (ts_name, ours)  # two model versions agree (README: 0.96-0.98 in 3D)
