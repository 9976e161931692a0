"""The outputs a run writes besides the mask: Grand Challenge layout with a vertebra socket, QC PNG, CSV, NIfTI, all or nothing."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

import process
from common.labels import LEVELS
from postprocess.outputs import StagedOutputs
from common.errors import OutputError
from tests.conftest import write_volume
from model.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(900_202, size_xy=(200, 170), spacing_mm=(1.8, 1.8, 8.0))


def _vertebra_map(phantom) -> np.ndarray:
    """A 'levels'-scheme map (1..13 = T4..L4): the phantom's bone voxels on each level's slices."""
    level = phantom.level_of_slice.astype(np.int64)
    bone = phantom.ct_zyx > 250
    return np.where(bone & (level[:, None, None] >= 0), level[:, None, None] + 1, 0).astype(np.uint8)


def _write(phantom, array, path):
    g = phantom.geometry
    return write_volume(array, path, spacing=g.spacing_mm, origin=g.origin_mm, direction=g.direction)


def _gc_input(tmp_path, phantom, vertebrae: np.ndarray) -> Path:
    root = tmp_path / "input"
    _write(phantom, phantom.ct_zyx, root / "images" / "ct" / "3f1c-ct.mha")
    _write(phantom, vertebrae, root / "images" / "vertebrae-segmentation" / "77ab-v.mha")
    sockets = [
        {"interface": {"slug": "ct-image", "kind": "Image", "super_kind": "Image", "relative_path": "images/ct"}, "image": {"pk": "3f1c"}},
        {"interface": {"slug": "vertebrae-segmentation", "kind": "Segmentation", "super_kind": "Image", "relative_path": "images/vertebrae-segmentation"},
         "image": {"pk": "77ab"}},
    ]
    (root / "inputs.json").write_text(json.dumps(sockets))
    return root


def test_grand_challenge_layout_with_a_vertebra_socket_gives_per_level_measures_and_a_thumbnail(tmp_path, phantom):
    out = tmp_path / "output"
    code = process.main(["--input", str(_gc_input(tmp_path, phantom, _vertebra_map(phantom))), "--output", str(out),
                         "--vertebra-labels", "levels", "--threads", "2"])
    assert code == 0
    case = json.loads((out / "results.json").read_text())["cases"][0]
    assert case["status"] == "succeeded"
    assert (out / case["output"]).is_file()
    # the thumbnail sits at the socket's relative_path: a real PNG with the picture's layout
    assert case["outputs"]["qc_png"] == "muscle-qc.png"
    with Image.open(out / "muscle-qc.png") as picture:
        assert picture.format == "PNG" and picture.mode == "RGB" and picture.width > 1000 and picture.height > 500
    levels = case["levels"]
    assert levels["available"] and levels["scheme"] == "levels"
    assert levels["levels_found"] == list(LEVELS)  # the phantom spans T4..L4
    for index, name in enumerate(LEVELS):
        entry = levels["per_level"][name]
        assert abs(entry["mid_slice"] - int(phantom.mid_slices[index])) <= 1  # the phantom's own mid-level slice
        assert entry["slices"][0] <= entry["mid_slice"] <= entry["slices"][1]
    # the CSV holds the per-slice table; its level column agrees with the phantom's levels
    rows = list(csv.DictReader((out / case["outputs"]["measures_csv"]).open()))
    assert rows and {r["level"] for r in rows} >= set(LEVELS)
    for row in rows[:200]:
        k = int(row["slice_index"])
        assert row["level"] == (LEVELS[phantom.level_of_slice[k]] if phantom.level_of_slice[k] >= 0 else "")
    assert os.stat(out / "muscle-qc.png").st_mode & 0o777 == 0o644
    assert not [p for p in out.rglob(".partial-*")]


def test_a_failure_after_some_outputs_were_staged_leaves_none_of_them(tmp_path, phantom, monkeypatch):
    import postprocess.report as report

    def broken(*args, **kwargs):
        raise OutputError("qc.png: No space left on device")

    monkeypatch.setattr(report, "png_bytes", broken)  # after the CSV is staged, before the mask is written
    folder = tmp_path / "in"
    _write(phantom, phantom.ct_zyx, folder / "phantom.mha")
    out = tmp_path / "out"
    code = process.main(["--input", str(folder), "--output", str(out), "--nifti", "--threads", "2"])
    assert code == OutputError.exit_code
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["results.json"]
    case = json.loads((out / "results.json").read_text())["cases"][0]
    assert case["status"] == "failed" and "No space left" in case["error"]


def test_a_bad_vertebra_map_fails_the_case_before_segmenting(tmp_path, phantom, capsys):
    vertebrae = _vertebra_map(phantom)
    vertebrae[0, 0, 0] = 99  # not a level in the 'levels' scheme
    folder = tmp_path / "in"
    _write(phantom, phantom.ct_zyx, folder / "phantom.mha")
    _write(phantom, vertebrae, tmp_path / "vertebrae" / "phantom.nii.gz")
    out = tmp_path / "out"
    code = process.main(["--input", str(folder), "--output", str(out), "--vertebrae", str(tmp_path / "vertebrae"), "--vertebra-labels", "levels"])
    assert code == 3
    err = capsys.readouterr().err
    assert "phantom.nii.gz" in err and "[99]" in err
    case = json.loads((out / "results.json").read_text())["cases"][0]
    assert case["status"] == "failed" and "segment" not in case.get("timings_s", {})
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["results.json"]


def test_folder_layout_without_vertebrae_says_so_and_writes_nifti_on_the_mask_grid(tmp_path, phantom):
    folder = tmp_path / "in"
    _write(phantom, phantom.ct_zyx, folder / "phantom.mha")
    out = tmp_path / "out"
    assert process.main(["--input", str(folder), "--output", str(out), "--nifti", "--threads", "2"]) == 0
    case = json.loads((out / "results.json").read_text())["cases"][0]
    assert case["levels"] == {"available": False, "reason": "no vertebra label map given with this CT: per-slice measures only"}
    assert case["outputs"]["qc_png"] == "qc/phantom.png" and (out / "qc" / "phantom.png").is_file()
    mask, nifti = sitk.ReadImage(str(out / case["output"])), sitk.ReadImage(str(out / case["outputs"]["nifti"]))
    assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(nifti))
    assert np.allclose(mask.GetOrigin(), nifti.GetOrigin(), atol=1e-4) and np.allclose(mask.GetSpacing(), nifti.GetSpacing())
    assert np.allclose(mask.GetDirection(), nifti.GetDirection(), atol=1e-6)
    assert "dicom_seg" not in case["outputs"]  # not a DICOM input
    muscle = case["muscles"]["erector_spinae_left"]
    assert muscle["volume_cm3"] > 0 and muscle["extent"]["levels"] is None


def test_staged_outputs_are_all_or_nothing(tmp_path):
    with StagedOutputs() as staged:
        staged.write_text(tmp_path / "a" / "one.txt", "1")
        staged.write_bytes(tmp_path / "two.bin", b"2")
        assert not (tmp_path / "two.bin").exists()  # nothing is in place before the block ends
    assert (tmp_path / "a" / "one.txt").read_text() == "1" and (tmp_path / "two.bin").read_bytes() == b"2"
    with pytest.raises(RuntimeError):
        with StagedOutputs() as staged:
            staged.write_text(tmp_path / "three.txt", "3")
            raise RuntimeError("boom")
    assert not (tmp_path / "three.txt").exists()
    assert not list(tmp_path.rglob(".partial-*"))


def test_dicom_input_gets_a_seg_that_matches_the_written_mask(tmp_path, ts_example):
    import highdicom as hd

    from postprocess.dicom_seg import read_source_series

    out = tmp_path / "out"
    series = ts_example / "example_ct_dicom"
    assert process.main(["--input", str(series), "--output", str(out), "--threads", "2"]) == 0
    case = json.loads((out / "results.json").read_text())["cases"][0]
    seg_entry = case["outputs"]["dicom_seg"]
    assert seg_entry["type"] == "binary" and seg_entry["derived_source_uids"] == ["SeriesInstanceUID", "StudyInstanceUID"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case["output"])))
    source = read_source_series(series)
    assert seg_entry["references_series"] == str(source.headers[0].SeriesInstanceUID)  # reproducible: re-derived here from the files
    seg = hd.seg.segread(out / seg_entry["path"])
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=[str(h.SOPInstanceUID) for h in source.headers], combine_segments=True)
    assert np.array_equal(back, mask)  # the DICOM series' slice order is the mask's z order (both sorted along the normal)
