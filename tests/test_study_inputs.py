"""Sites' own data: DICOM studies as a PACS exports them (flat, nested, DICOMDIR, zip, trees), single image files,
the series rule and its overrides, hostile archives, the viewers' colour tables, and the model mount."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import process
from common.errors import InputError
from preprocess.inputs import find_cases
from preprocess.study import Series, SeriesRule, Study, choose_series, classify_kernel
from tests import study_helpers as sh
from tests.conftest import DEMO_MODEL, write_volume

SLUG = process.OUTPUT_SLUG
EXPECTED_SKIP = {  # role -> what its reason must say
    "lung": r"kernel Br64f is sharp",
    "thick": r"thickness 6 mm is further from the model's 1.5 mm than the chosen series' 3 mm",
    "phase2": r"6 slices, fewer than the chosen series' 8",
    "scout": r"localizer \(ImageType LOCALIZER\)",
    "coronal": r"coronal reformat \(ImageType DERIVED\) images: not axial",
    "dose_sr": r"not CT: modality SR \(a structured report, e\.g\. a dose report\)",
    "dose_sc": r"secondary capture",
}


@pytest.fixture(scope="session")
def slices(ts_example):
    return sh.sample_slices(ts_example / "example_ct_dicom")


@pytest.fixture()
def study(slices):
    return sh.build_study(slices)


def run_cli(capsys, *args: str) -> tuple[int, list[str], str]:
    code = process.main([*args, "--threads", "1"])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def assert_study_choice(case, study) -> None:
    """The soft-tissue 3 mm series is chosen; every other series is listed with the reason the rule gives."""
    assert case.source.series_uid == study.uid_of("soft")
    read = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in case.source.files}
    assert read == {str(ds.SOPInstanceUID) for ds in study.series["soft"][1]}
    chosen = case.selection["chosen"]
    assert (chosen["series_uid"], chosen["kernel"], chosen["kernel_class"], chosen["thickness_mm"], chosen["slices"]) == (
        study.uid_of("soft"), "Br38f", "soft", 3.0, 8)
    assert "ranks after it" in chosen["why"]
    reasons = {s["series_uid"]: s["reason"] for s in case.selection["skipped"]}
    assert set(reasons) == {study.uid_of(role) for role in EXPECTED_SKIP}
    for role, pattern in EXPECTED_SKIP.items():
        assert re.search(pattern, reasons[study.uid_of(role)]), (role, reasons[study.uid_of(role)])


# ------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("kernel, kind", [
    ("STANDARD", "soft"), ("SOFT", "soft"), ("LUNG", "sharp"), ("BONEPLUS", "sharp"), ("DETAIL", "sharp"),  # GE
    ("B30f", "soft"), ("Br38f", "soft"), ("I30f", "soft"), ("Qr40d", "soft"), ("B70f", "sharp"), ("Br64f", "sharp"), ("Bl57d", "sharp"),  # Siemens
    ("B", "soft"), ("A", "soft"), ("UB", "soft"), ("L", "sharp"), ("YC", "sharp"), ("D", "sharp"),  # Philips
    ("FC08", "soft"), ("FC18", "soft"), ("FC51", "sharp"), ("FC86", "sharp"),  # Canon / Toshiba
    ("Body Sharp", "sharp"), ("BODY", "soft"), ("", "unknown"), ("XYZ", "unknown"), ("C", "unknown"),
])
def test_kernel_table_sorts_the_main_vendors_kernels(kernel, kind):
    assert classify_kernel(kernel) == kind


def _series(uid, *, kernel="B30f", thickness=3.0, slices=40, dropped=None, description=""):
    return Series(series_uid=uid, number=None, description=description, modality="CT", kernel=kernel, kernel_class=classify_kernel(kernel),
                  thickness_mm=thickness, slices=slices, files=(Path(uid),), dropped=dropped)


def _choose(*series, **rule):
    return choose_series(Study(key="1.2", study_uid="1.2", folder=Path("study"), series=tuple(series)), SeriesRule(target_thickness_mm=1.5, **rule))


def test_each_step_of_the_rule_decides_only_when_the_steps_before_it_tie():
    # kernel before thickness: a sharp series at the target thickness loses to a soft one far from it
    assert _choose(_series("1.1", kernel="B70f", thickness=1.5), _series("1.2", kernel="B30f", thickness=5.0)).chosen[0].series_uid == "1.2"
    # unknown kernels rank between soft and sharp
    assert _choose(_series("1.1", kernel="B70f"), _series("1.2", kernel="")).chosen[0].series_uid == "1.2"
    assert _choose(_series("1.1", kernel="B30f"), _series("1.2", kernel="")).chosen[0].series_uid == "1.1"
    # thickness before slice count
    assert _choose(_series("1.1", thickness=5.0, slices=400), _series("1.2", thickness=1.0, slices=100)).chosen[0].series_uid == "1.2"
    # slice count, then the UID (never the order given)
    assert _choose(_series("1.1", slices=90), _series("1.2", slices=100)).chosen[0].series_uid == "1.2"
    assert _choose(_series("1.9"), _series("1.10")).chosen[0].series_uid == "1.10"  # "1.10" < "1.9" as text
    assert _choose(_series("1.10"), _series("1.9")).chosen[0].series_uid == "1.10"


def test_overrides_pick_by_uid_by_description_or_every_series():
    a, b, c = _series("1.1", description="Arterial"), _series("1.2", description="Venous", kernel="B70f"), _series("1.3", slices=2)
    assert _choose(a, b, c, series_uid="1.2").chosen == (b,)
    assert _choose(a, b, c, description="ven").chosen == (b,)
    assert _choose(a, b, c, all_series=True).chosen == (a, b)
    with pytest.raises(InputError, match=r"no CT series to segment .*2 slices, fewer than 4.*not the series --series-uid names"):
        _choose(a, c, series_uid="1.2")


def test_a_study_without_an_axial_ct_lists_what_it_found():
    with pytest.raises(InputError) as error:
        _choose(_series("1.1", dropped="localizer (ImageType LOCALIZER)", slices=2), _series("1.2", dropped="not CT: modality SR"))
    message = str(error.value)
    assert "\n" not in message and "localizer" in message and "modality SR" in message and "2 files" in message


# --------------------------------------------------------------------------- layouts of a real study


@pytest.mark.parametrize("layout", ["flat", "nested", "dicomdir"])
def test_a_pacs_study_in_any_layout_is_one_case_with_the_rules_series(tmp_path, study, layout):
    root = tmp_path / "export"
    given = {"flat": sh.write_flat, "nested": sh.write_nested, "dicomdir": sh.write_dicomdir}[layout](study, root)
    cases = find_cases(given).cases
    assert len(cases) == 1
    assert_study_choice(cases[0], study)
    assert sh.PATIENT_NAME.split("^")[0] not in cases[0].case_id and sh.PATIENT_ID not in cases[0].case_id
    if layout != "dicomdir":
        assert (cases[0].case_id, cases[0].id_from) == ("export", "folder name")


def test_a_tree_of_studies_at_any_depth_gives_one_case_per_study_named_without_patient_identity(tmp_path, slices):
    first, second, third = sh.build_study(slices), sh.build_study(slices), sh.build_study(slices)
    sh.write_nested(first, tmp_path / "in" / "site-a" / "2024" / "exam-17")
    sh.write_flat(second, tmp_path / "in" / "site-b")
    sh.write_flat(third, tmp_path / "in" / "site-b")  # two studies mixed in one folder: named by a hash of their UIDs
    cases = {c.case_id: c for c in find_cases(tmp_path / "in").cases}
    expected = {"exam-17": first, **{f"study-{hashlib.sha256(s.study_uid.encode()).hexdigest()[:10]}": s for s in (second, third)}}
    assert set(cases) == set(expected)
    for name, built in expected.items():
        assert_study_choice(cases[name], built)
    assert cases["exam-17"].id_from == "folder name" and cases[next(n for n in expected if n.startswith("study-"))].id_from.startswith("hash")


def test_all_series_makes_each_axial_ct_series_a_case(tmp_path, study):
    cases = find_cases(sh.write_flat(study, tmp_path / "export"), rule=SeriesRule(all_series=True)).cases
    assert {c.case_id: c.source.series_uid for c in cases} == {f"export_s{n}": study.uid_of(role)
                                                               for n, role in ((2, "soft"), (3, "lung"), (4, "thick"), (5, "phase2"))}


# ----------------------------------------------------------------------------------- end to end


def _series_grid(files) -> sitk.Image:
    """The chosen series' grid as GDCM orders it: an oracle independent of preprocess/dicom.py."""
    folder = Path(files[0]).parent
    reader = sitk.ImageSeriesReader()
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return reader.Execute()


def _check_run(out: Path, case_id: str, study, err: str, export: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    (case,) = results["cases"]
    assert case["status"] == "succeeded" and case["case_id"] == case_id
    assert case["series"]["chosen"]["series_uid"] == study.uid_of("soft") and len(case["series"]["skipped"]) == len(EXPECTED_SKIP)
    assert "phantoms only" in case["warning"] and f"warning: {case_id}: segmented with the bundled demo model" in err
    mask = sitk.ReadImage(str(out / "images" / SLUG / f"{case_id}.nii.gz"))
    grid = _series_grid([f for f in sorted(export.rglob("*"))
                         if f.is_file() and pydicom.dcmread(f, stop_before_pixels=True).get("SeriesInstanceUID") == study.uid_of("soft")])
    assert mask.GetSize() == grid.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), grid.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetSpacing(), grid.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), grid.GetDirection(), atol=1e-5)
    seg = pydicom.dcmread(out / case["outputs"]["dicom_seg"]["path"])
    assert seg.SegmentationType == "BINARY" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.uid_of("soft")
    return case


def test_a_flat_study_is_segmented_on_the_chosen_series_grid_with_seg_nifti_and_viewer_tables(tmp_path, study, capsys):
    sh.write_flat(study, tmp_path / "export")
    code, errors, err = run_cli(capsys, "-i", str(tmp_path / "export"), "-o", str(tmp_path / "out"))
    assert code == 0 and not errors, err
    case = _check_run(tmp_path / "out", "export", study, err, tmp_path / "export")
    assert case["case_id_from"] == "folder name"
    tables = case["outputs"]["viewer_colour_tables"]
    assert (tmp_path / "out" / tables["3d_slicer"]).is_file() and (tmp_path / "out" / tables["itk_snap"]).is_file()


def test_a_zip_of_a_nested_study_gives_the_same_case_and_leaves_nothing_unpacked(tmp_path, study, capsys, monkeypatch):
    sh.write_nested(study, tmp_path / "export")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted((tmp_path / "export").rglob("*")):
            zipped.write(path, Path("export") / path.relative_to(tmp_path / "export"))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    code, errors, err = run_cli(capsys, "-i", str(archive), "-o", str(tmp_path / "out"))
    assert code == 0 and not errors, err
    _check_run(tmp_path / "out", "export", study, err, tmp_path / "export")
    assert list(temp.iterdir()) == []
    # the results name the files inside the archive, never the temporary copy that is gone now
    results = (tmp_path / "out" / "results.json").read_text()
    assert "trunkseg-zip-" not in results and "trunkseg-zip-" not in err
    case = json.loads(results)["cases"][0]
    assert case["input"].startswith(str(archive) + "/"), case["input"]


# ------------------------------------------------------------------------------------ hostile zips


def _zip_with(path: Path, name: str, data: bytes, *, mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zipped:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        if mode is not None:
            info.external_attr = mode << 16
        zipped.writestr(info, data)
    return path



def _zip_twice(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: that is the point
        with zipfile.ZipFile(path, "w") as zipped:
            zipped.writestr("a/b.dcm", b"first")
            zipped.writestr("a/b.dcm", b"second")
    return path


HOSTILE = {
    "zip-slip": (lambda p: _zip_with(p, "../../escaped.dcm", b"x" * 100), r"outside the folder .*zip-slip"),
    "absolute-path": (lambda p: _zip_with(p, "/tmp/escaped.dcm", b"x" * 100), r"zip-slip"),
    "zip-slip-backslashes": (lambda p: _zip_with(p, "..\\..\\escaped.dcm", b"x" * 100), r"zip-slip"),
    "member-twice": (lambda p: _zip_twice(p), r"member a/b.dcm appears twice"),
    "zip-bomb": (lambda p: _zip_with(p, "bomb.dcm", bytes(64 * 2**20)), r"zip bomb"),
    "symlink-member": (lambda p: _zip_with(p, "link.dcm", b"/etc/passwd", mode=stat.S_IFLNK | 0o777), r"symbolic link"),
    "not-a-zip": (lambda p: (p.write_bytes(b"PK\x03\x04 but nothing after"), p)[1], r"not a readable \.zip"),
}


@pytest.mark.parametrize("make, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_zip_is_refused_with_exit_3_and_leaves_nothing(tmp_path, capsys, monkeypatch, make, message):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    archive = make(work / "input.zip")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    code, errors, err = run_cli(capsys, "-i", str(archive), "-o", str(tmp_path / "out"))
    assert code == 3 and len(errors) == 1 and re.search(message, errors[0]), err
    assert list(temp.iterdir()) == []
    assert not any(p.name == "escaped.dcm" for p in tmp_path.rglob("*")) and not Path("/tmp/escaped.dcm").exists()
    assert not (tmp_path / "out").exists() or [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] in ([], ["results.json"])


def test_declared_sizes_beyond_the_budget_are_refused_before_a_byte_is_written(tmp_path):
    from preprocess.archive import unpacked_archive

    archive = _zip_with(tmp_path / "big.zip", "a.dcm", os.urandom(3 * 2**20))
    with pytest.raises(InputError, match="more than the budget"):
        with unpacked_archive(archive, budget_bytes=2**20, temp_dir=tmp_path):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["big.zip"]


def test_a_member_whose_header_understates_its_size_is_refused_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    archive = _zip_with(tmp_path / "lying.zip", "a.dcm", bytes(2**20))
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 24:central + 28] = (1000).to_bytes(4, "little")  # the directory's uncompressed size: 1000 bytes, not 1 MiB
    archive.write_bytes(bytes(data))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    code, errors, err = run_cli(capsys, "-i", str(archive), "-o", str(tmp_path / "out"))
    assert code == 3 and len(errors) == 1 and re.search(r"lying\.zip: (not a readable \.zip|member .* inflates past)", errors[0]), err
    assert list(temp.iterdir()) == [] and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ single files


@pytest.mark.parametrize("name, extra, expected", [
    ("ct.nii.gz", (), "ct.nii.gz"), ("ct.nii", (), "ct.nii.gz"), ("ct.mha", (), "ct.mha"), ("ct.nrrd", (), "ct.nrrd"),
    ("ct.nii.gz", ("--format", "mha"), "ct.mha"), ("ct.mha", ("--format", "nrrd"), "ct.nrrd"),
])
def test_one_image_file_is_one_case_and_its_mask_keeps_its_format_family(tmp_path, capsys, name, extra, expected):
    rng = np.random.default_rng(3)
    ct = np.where(rng.random((4, 40, 48)) > 0.5, 40, -900).astype(np.int16)
    path = write_volume(ct, tmp_path / name, spacing=(0.9, 0.9, 3.0))
    code, errors, err = run_cli(capsys, "-i", str(path), "-o", str(tmp_path / "out"), *extra)
    assert code == 0 and not errors, err
    (mask,) = (tmp_path / "out" / "images" / SLUG).iterdir()
    assert mask.name == expected
    assert sitk.ReadImage(str(mask)).GetSize() == sitk.ReadImage(str(path)).GetSize()
    case = json.loads((tmp_path / "out" / "results.json").read_text())["cases"][0]
    assert case["case_id_from"] == "file name" and case["output"] == f"images/{SLUG}/{expected}"


# ------------------------------------------------------------------------------------ viewer tables


def _canonical() -> dict[str, int]:
    return json.loads((Path(process.REPO) / "common" / "labels.json").read_text())["labels"]


def test_the_slicer_colour_table_reads_back_per_slicers_format_with_the_qc_colours():
    from postprocess.colours import colour_lookup_table
    from postprocess.viewers import slicer_colour_table

    lines = slicer_colour_table().splitlines()
    assert lines[0].startswith("# Color table file") and lines[1] == f"# {len(_canonical()) + 1} values"
    rows = [line.split() for line in lines if not line.startswith("#")]
    assert all(len(row) == 6 for row in rows)  # value name R G B A, names without spaces
    table = {int(row[0]): (row[1], tuple(int(v) for v in row[2:6])) for row in rows}
    assert table[0] == ("background", (0, 0, 0, 0))
    lut = colour_lookup_table()
    for name, value in _canonical().items():
        assert table[value] == (name, (*(int(c) for c in lut[value]), 255))


def test_the_itksnap_label_file_reads_back_per_itksnaps_format_with_the_qc_colours():
    from postprocess.colours import colour_lookup_table
    from postprocess.viewers import itksnap_label_description

    pattern = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')
    text = itksnap_label_description()
    assert "# ITK-SnAP Label Description File" in text.splitlines()
    rows = [pattern.match(line) for line in text.splitlines() if not line.startswith("#")]
    assert all(rows)
    table = {int(m[1]): (m[8], (int(m[2]), int(m[3]), int(m[4])), float(m[5])) for m in rows}
    assert table[0][0] == "Clear Label" and table[0][2] == 0
    lut = colour_lookup_table()
    for name, value in _canonical().items():
        assert table[value] == (name, tuple(int(c) for c in lut[value]), 1.0)


# ------------------------------------------------------------------------------------ model mount, platform


def test_a_model_mount_holding_the_package_one_folder_down_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv("TRUNKSEG_MODEL", raising=False)
    shutil.copytree(DEMO_MODEL, tmp_path / "mount" / "trunkseg-model")
    monkeypatch.setattr(process, "GC_MODEL", tmp_path / "mount")
    assert process.default_model() == tmp_path / "mount" / "trunkseg-model"
    monkeypatch.setattr(process, "GC_MODEL", tmp_path / "mount" / "trunkseg-model")
    assert process.default_model() == tmp_path / "mount" / "trunkseg-model"
    monkeypatch.setattr(process, "GC_MODEL", tmp_path / "absent")
    assert process.default_model() == process.BUNDLED_MODEL
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(process, "GC_MODEL", tmp_path / "empty")
    assert process.default_model() == process.BUNDLED_MODEL


def test_a_non_empty_model_mount_without_a_model_card_exits_4_naming_what_it_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRUNKSEG_MODEL", raising=False)
    (tmp_path / "mount" / "nnUNet_results").mkdir(parents=True)
    (tmp_path / "mount" / "weights.pth").write_bytes(b"\0")
    monkeypatch.setattr(process, "GC_MODEL", tmp_path / "mount")
    write_volume(np.zeros((2, 16, 16), np.int16), tmp_path / "in" / "a.mha")
    code, errors, err = run_cli(capsys, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert code == 4 and len(errors) == 1, err
    assert "nnUNet_results/" in errors[0] and "weights.pth" in errors[0] and "no model card" in errors[0] and "phantom" in errors[0]


def test_without_sched_getaffinity_the_thread_default_is_the_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    args = process.parse_args(["--input", "x"])  # no crash; the count is os.cpu_count() unless a quota or Slurm grants fewer
    assert 1 <= args.threads <= (os.cpu_count() or 1) and "sched_getaffinity" not in args.threads_origin


# ------------------------------------------------------------------------------------ evaluation labels


def test_grand_challenges_overlay_segments_list_is_a_labels_file(tmp_path):
    from evaluation.errors import ConfigError
    from evaluation.labels import load_label_set

    segments = [{"name": "background", "voxel_value": 0, "visible": False},
                {"name": "psoas_major_left", "voxel_value": 20, "visible": True},
                {"name": "psoas_major_right", "voxel_value": 19, "visible": True}]
    (tmp_path / "segments.json").write_text(json.dumps(segments))
    labels = load_label_set(tmp_path / "segments.json")
    assert (labels.names, labels.values, labels.ignore) == (("psoas_major_right", "psoas_major_left"), (19, 20), None)
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "a"}]))
    with pytest.raises(ConfigError, match="overlay segment 0 must be an object with 'name' and 'voxel_value'"):
        load_label_set(tmp_path / "bad.json")


def test_overrides_reach_a_real_study_and_a_tree(tmp_path, slices):
    first, second = sh.build_study(slices), sh.build_study(slices)
    sh.write_flat(first, tmp_path / "in" / "a")
    sh.write_nested(second, tmp_path / "in" / "b")
    (case,) = find_cases(tmp_path / "in", rule=SeriesRule(series_uid=second.uid_of("lung"))).cases
    assert (case.case_id, case.source.series_uid) == ("b", second.uid_of("lung"))
    cases = find_cases(tmp_path / "in", rule=SeriesRule(description=r"^venous")).cases
    assert {c.case_id: c.source.series_uid for c in cases} == {"a": first.uid_of("phase2"), "b": second.uid_of("phase2")}
    assert all("--series-description" in c.selection["chosen"]["why"] for c in cases)
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 1.2.3 "):
        find_cases(tmp_path / "in", rule=SeriesRule(series_uid="1.2.3"))


def test_a_series_description_that_is_no_regular_expression_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        process.parse_args(["-i", str(tmp_path), "--series-description", "(venous"])
    assert stopped.value.code == 2 and "--series-description '(venous' is not a regular expression" in capsys.readouterr().err


def test_image_files_in_a_tree_are_cases_named_by_file_or_by_path_where_names_repeat(tmp_path):
    for relative in ("s0001/ct.nii.gz", "s0002/ct.nii.gz", "other/scan.mha"):
        write_volume(np.zeros((2, 16, 16), np.int16), tmp_path / "in" / relative)
    cases = {c.case_id: (c.source, c.id_from) for c in find_cases(tmp_path / "in").cases}
    assert cases == {"s0001_ct": (tmp_path / "in" / "s0001" / "ct.nii.gz", "file path (file names repeat)"),
                     "s0002_ct": (tmp_path / "in" / "s0002" / "ct.nii.gz", "file path (file names repeat)"),
                     "scan": (tmp_path / "in" / "other" / "scan.mha", "file name")}
