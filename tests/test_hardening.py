"""Hostile and broken inputs through the real entry point: one clear line, a documented exit code, nothing partial.

Every item of the corpus (tests/hardening_corpus.py) is driven through process.main (the CLI, in
process) and a few through `python process.py` as a subprocess (disk full, a hung case); the container
runs a handful more (tests/test_hardening_containers.py). Exit codes: common/errors.py.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import process
from preprocess.geometry import Geometry
from tests import hardening_corpus as corpus
from tests.conftest import REPO

SLUG = "muscle-segmentation"
BAD_INPUT, OUTPUT, LIMIT = 3, 5, 7


def run_cli(input_dir: Path, output_dir: Path, capsys, *extra: str) -> tuple[int, list[str], str]:
    code = process.main(["--input", str(input_dir), "--output", str(output_dir), "--threads", "1", *extra])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def assert_nothing_partial(output_dir: Path) -> None:
    """No mask, no temporary file: at most a complete results.json that lists the failure."""
    left = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file()) if output_dir.exists() else []
    assert left in ([], ["results.json"]), left
    if left:
        cases = json.loads((output_dir / "results.json").read_text())["cases"]
        assert cases and all(c["status"] == "failed" for c in cases)


# --------------------------------------------------------------------------------- the corpus

FILES = {
    "empty-file": (lambda d: (d / "ct.mha").write_bytes(b""), BAD_INPUT, r"ct\.mha: file is empty"),
    "truncated-mha": (lambda d: corpus.truncate(corpus.write_image(corpus.small_ct(), d / "ct.mha")), BAD_INPUT, r"ct\.mha"),
    "truncated-nii-gz": (lambda d: corpus.truncate(corpus.write_image(corpus.small_ct(), d / "ct.nii.gz")), BAD_INPUT, r"ct\.nii\.gz: corrupt or truncated"),
    "truncated-nii": (lambda d: corpus.truncate(corpus.write_image(corpus.small_ct(), d / "ct.nii", compress=False), 0.9), BAD_INPUT, r"ct\.nii: truncated NIfTI"),
    "nii-gz-of-a-truncated-nii": (lambda d: (corpus.truncate(corpus.write_image(corpus.small_ct(), d / "x.nii", compress=False), 0.9),
                                             (d / "ct.nii.gz").write_bytes(gzip.compress((d / "x.nii").read_bytes())), (d / "x.nii").unlink()),
                                  BAD_INPUT, r"ct\.nii\.gz: truncated NIfTI"),
    "truncated-nrrd": (lambda d: corpus.truncate(corpus.write_image(corpus.small_ct(), d / "ct.nrrd")), BAD_INPUT, r"ct\.nrrd"),
    "truncated-raw-nrrd": (lambda d: corpus.truncate(corpus.write_image(corpus.small_ct(), d / "ct.nrrd", compress=False)), BAD_INPUT, r"ct\.nrrd"),
    "nifti-named-mha": (lambda d: (corpus.write_image(corpus.small_ct(), d / "x.nii"), (d / "x.nii").rename(d / "ct.mha")), BAD_INPUT, r"ct\.mha: line 1 is no 'Key = Value' pair .*: not a MetaImage header"),
    "raw-nii-named-nii-gz": (lambda d: (corpus.write_image(corpus.small_ct(), d / "x.nii"), (d / "x.nii").rename(d / "ct.nii.gz")), BAD_INPUT, r"ct\.nii\.gz: corrupt or truncated gzip"),
    "text-named-nrrd": (lambda d: (d / "ct.nrrd").write_text("NRRD0004\nthis is not a header\n"), BAD_INPUT, r"ct\.nrrd: cannot be read"),
    "gzip-bomb": (lambda d: corpus.gzip_bomb(d / "ct.nii.gz", inflated_mib=512), BAD_INPUT, r"ct\.nii\.gz: gzip data inflates past .*gzip bomb"),
    "header-claims-huge-size": (lambda d: (d / "ct.mha").write_bytes(corpus.mha_header((100000, 100000, 100000), data=b"\0" * 64)), LIMIT,
                                r"ct\.mha: 100000x100000x100000 voxels .* GiB budget"),
    "2d-image": (lambda d: corpus.write_image(corpus.small_ct()[0], d / "ct.mha"), BAD_INPUT, r"ct\.mha: expected a 3D image, got 2D"),
    "4d-image": (lambda d: corpus.write_image(np.stack([corpus.small_ct()] * 2), d / "ct.nii.gz"), BAD_INPUT, r"ct\.nii\.gz: expected a 3D image, got 4D"),
    "rgb-pixels": (lambda d: corpus.write_image(np.zeros((4, 40, 48, 3), np.uint8), d / "ct.mha", is_vector=True), BAD_INPUT, r"ct\.mha: expected scalar voxels"),
    "vector-float-pixels": (lambda d: corpus.write_image(np.zeros((4, 40, 48, 2), np.float32), d / "ct.nrrd", is_vector=True), BAD_INPUT, r"ct\.nrrd: expected scalar voxels"),
    "complex-pixels-mha": (lambda d: corpus.write_image(corpus.small_ct().astype(np.complex64), d / "ct.mha"), BAD_INPUT, r"ct\.mha: expected scalar voxels, got 2"),
    "complex-pixels": (lambda d: corpus.write_image(corpus.small_ct().astype(np.complex64), d / "ct.nii.gz"), BAD_INPUT, r"ct\.nii\.gz: unsupported pixel type complex"),
    "boolean-pixels": (lambda d: corpus.write_image((corpus.small_ct() > 0).astype(np.uint8), d / "ct.mha"), BAD_INPUT, r"ct\.mha: image is values span only 0 to 1"),
    "nan-voxels": (lambda d: corpus.write_image(np.where(corpus.small_ct() > 600, np.nan, corpus.small_ct()).astype(np.float32), d / "ct.mha"), BAD_INPUT, r"ct\.mha: image holds NaN"),
    "inf-voxels": (lambda d: corpus.write_image(np.where(corpus.small_ct() > 600, np.inf, corpus.small_ct()).astype(np.float32), d / "ct.nrrd"), BAD_INPUT, r"ct\.nrrd: image holds NaN or infinite"),
    "all-constant": (lambda d: corpus.write_image(np.full((4, 40, 48), -1000, np.int16), d / "ct.mha"), BAD_INPUT, r"ct\.mha: image is constant"),
    "too-small-in-plane": (lambda d: corpus.write_image(corpus.small_ct(shape_zyx=(4, 5, 48)), d / "ct.mha"), BAD_INPUT, r"too small"),
    "zero-spacing": (lambda d: (d / "ct.mha").write_bytes(corpus.mha_header((48, 40, 4), data=corpus.small_ct().tobytes()).replace(b"ElementSpacing = 0.8", b"ElementSpacing = 0")),
                     BAD_INPUT, r"ct\.mha: (invalid voxel spacing|cannot be read)"),
    "mhd-data-file-outside": (lambda d: (corpus.write_image(corpus.small_ct(), d.parent / "outside" / "ct.mhd", compress=False),
                                          (d / "ct.mhd").write_text((d.parent / "outside" / "ct.mhd").read_text().replace("ElementDataFile = ct.raw", "ElementDataFile = ../outside/ct.raw"))),
                              BAD_INPUT, r"ct\.mhd: its data file '\.\./outside/ct\.raw' lies outside"),
    "mhd-data-file-absolute": (lambda d: (d / "ct.mhd").write_bytes(corpus.mha_header((8, 8, 1)).replace(b"LOCAL", b"/etc/passwd")), BAD_INPUT, r"ct\.mhd: its data file '/etc/passwd' lies outside"),
    "mhd-data-file-a-fifo": (lambda d: (os.mkfifo(d / "ct.raw"), (d / "ct.mhd").write_bytes(corpus.mha_header((8, 8, 1)).replace(b"LOCAL", b"ct.raw"))),
                             BAD_INPUT, r"ct\.mhd: its data file 'ct\.raw' is missing or not a regular file"),
    "mhd-data-file-name-too-long": (lambda d: (d / "ct.mhd").write_bytes(corpus.mha_header((8, 8, 1)).replace(b"LOCAL", b"x" * 300)),  # found by fuzzing
                                    BAD_INPUT, r"ct\.mhd: its data file 'x+' is missing or not a regular file"),
    "nhdr-data-file-list": (lambda d: (d / "ct.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 2\nencoding: raw\ndata file: LIST\na.raw\nb.raw\n"),
                            BAD_INPUT, r"ct\.nhdr: the header names its data as a list"),
}

DICOM = {
    "dicom-mr": (lambda d: corpus.dicom_series(d / "mr", modality="MR"), BAD_INPUT, r"mr: no CT series to segment in this study \(found series 1 .*not CT: modality MR\)"),
    "dicom-seg": (lambda d: corpus._non_image_dicom(d / "seg" / "seg.dcm", "SEG", "1.2.840.10008.5.1.4.1.1.66.4"), BAD_INPUT, r"no CT series to segment .*not CT: modality SEG \(a segmentation\)"),
    "dicom-rtstruct": (lambda d: corpus._non_image_dicom(d / "rt" / "rt.dcm", "RTSTRUCT", "1.2.840.10008.5.1.4.1.1.481.3"), BAD_INPUT, r"no CT series to segment .*not CT: modality RTSTRUCT"),
    "dicom-two-series": (lambda d: corpus.dicom_series(d / "s", edit=lambda i, ds: setattr(ds, "SeriesInstanceUID", f"1.2.3.{i % 2}")), BAD_INPUT,
                         r"no CT series to segment .*2 slices, fewer than 4: no volume; .*2 slices, fewer than 4"),
    "dicom-missing-slice": (lambda d: (corpus.dicom_series(d / "s", n=6), (d / "s" / "slice003.dcm").unlink()), BAD_INPUT, r"missing slices"),
    "dicom-duplicate-position": (lambda d: corpus.dicom_series(d / "s", edit=lambda i, ds: setattr(ds, "ImagePositionPatient", [0.0, 0.0, 8.0 * min(i, 2)])),
                                 BAD_INPUT, r"two slices share the same position"),
    "dicom-mixed-orientation": (lambda d: corpus.dicom_series(d / "s", edit=lambda i, ds: i == 2 and setattr(ds, "ImageOrientationPatient", [0.0, 1.0, 0.0, 1.0, 0.0, 0.0])),
                                BAD_INPUT, r"orientation differs"),
    "dicom-mixed-orientation-no-uids": (lambda d: corpus.dicom_series(d / "s", edit=lambda i, ds: (setattr(ds, "SeriesInstanceUID", ""),
                                        i == 2 and setattr(ds, "ImageOrientationPatient", [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]))), BAD_INPUT,
                                        r"no CT series to segment .*(missing slices|fewer than 4).*(missing slices|fewer than 4)"),
    "dicom-enhanced-multiframe": (lambda d: corpus.enhanced_ct(d / "e" / "enhanced.dcm"), BAD_INPUT, r"e: no CT series to segment .*multi-frame \(enhanced\) CT is not supported"),
    "dicom-malformed-orientation": (lambda d: corpus.dicom_series(d / "s", edit=lambda i, ds: setattr(ds, "ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 1.0])),
                                    BAD_INPUT, r"ImageOrientationPatient must be 6 finite numbers"),
    "dicom-no-pixel-spacing": (lambda d: corpus.dicom_series(d / "s", edit=lambda i, ds: delattr(ds, "PixelSpacing")), BAD_INPUT, r"PixelSpacing is missing"),
    "dicom-only-junk-files": (lambda d: ((d / "s").mkdir(parents=True), (d / "s" / "a.dcm").write_bytes(b"\0" * 300)), BAD_INPUT, r"no CT image slices found"),
}

CONTRACT = {
    "input-missing": (lambda d: None, BAD_INPUT, r"input does not exist \(no such file or folder\)"),
    "input-empty": (lambda d: d.mkdir(), BAD_INPUT, r"input folder is empty"),
    "two-sockets-without-inputs-json": (lambda d: (corpus.write_image(corpus.small_ct(), d / "images" / "ct-a" / "a.mha"),
                                                    corpus.write_image(corpus.small_ct(), d / "images" / "ct-b" / "b.mha")), BAD_INPUT, r"expected one image socket folder .* ct-a, ct-b"),
    "two-images-in-one-socket": (lambda d: (corpus.write_image(corpus.small_ct(), d / "images" / "ct" / "a.mha"),
                                             corpus.write_image(corpus.small_ct(), d / "images" / "ct" / "b.mha")), BAD_INPUT, r"holds 2 images"),
    "inputs-json-not-json": (lambda d: corpus.write_inputs_json(d, "{not json"), BAD_INPUT, r"inputs\.json: not valid JSON"),
    "inputs-json-not-utf8": (lambda d: (d.mkdir(), (d / "inputs.json").write_bytes(b"\xff\xfe[\x00")), BAD_INPUT, r"inputs\.json: not valid JSON"),
    "inputs-json-deep-nesting": (lambda d: corpus.write_inputs_json(d, "[" * 100_000 + "]" * 100_000), BAD_INPUT, r"inputs\.json: not valid JSON"),
    "inputs-json-an-object": (lambda d: corpus.write_inputs_json(d, {"interface": {}}), BAD_INPUT, r"expected a list"),
    "inputs-json-path-traversal": (lambda d: corpus.write_inputs_json(d, [corpus.socket(relative_path="../../etc")]), BAD_INPUT, r"outside the input folder"),
    "inputs-json-absolute-path": (lambda d: corpus.write_inputs_json(d, [corpus.socket(relative_path="/etc")]), BAD_INPUT, r"no usable relative_path"),
    "inputs-json-nul-in-path": (lambda d: corpus.write_inputs_json(d, [corpus.socket(relative_path="images/c\u0000t")]), BAD_INPUT, r"inputs\.json"),
    "inputs-json-unknown-interface": (lambda d: corpus.write_inputs_json(d, [corpus.socket(kind="String")]), BAD_INPUT, r"expected exactly one CT image input.*found none"),
    "symlinked-socket-folder-outside": (lambda d: (corpus.write_image(corpus.small_ct(), d.parent / "outside" / "ct.mha"), (d / "images").mkdir(parents=True),
                                                    (d / "images" / "ct").symlink_to(d.parent / "outside"), corpus.write_inputs_json(d, [corpus.socket()])),
                                        BAD_INPUT, r"outside the input folder"),
    "symlinked-image-outside": (lambda d: (corpus.write_image(corpus.small_ct(), d.parent / "outside" / "ct.mha"), (d / "images" / "ct").mkdir(parents=True),
                                            (d / "images" / "ct" / "ct.mha").symlink_to(d.parent / "outside" / "ct.mha"), corpus.write_inputs_json(d, [corpus.socket()])),
                                BAD_INPUT, r"outside the input folder"),
}


@pytest.mark.parametrize("make, code, message", FILES.values(), ids=FILES.keys())
def test_bad_file_fails_with_one_line_its_code_and_no_output(tmp_path, capsys, make, code, message):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    got, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--memory-limit-gb", "6")
    assert got == code, err
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert_nothing_partial(tmp_path / "out")


@pytest.mark.parametrize("make, code, message", DICOM.values(), ids=DICOM.keys())
def test_bad_dicom_folder_fails_with_one_line_its_code_and_no_output(tmp_path, capsys, make, code, message):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    got, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys)
    assert got == code, err
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert_nothing_partial(tmp_path / "out")


@pytest.mark.parametrize("make, code, message", CONTRACT.values(), ids=CONTRACT.keys())
def test_bad_input_layout_fails_with_one_line_its_code_and_no_output(tmp_path, capsys, make, code, message):
    make(tmp_path / "in")
    got, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys)
    assert got == code, err
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert_nothing_partial(tmp_path / "out")


# ------------------------------------------------------------------- inputs that must still work


def _seg_of_the_same_study(folder: Path) -> None:
    """A SEG object beside the CT slices, in their study (as a PACS exports a study with its derived objects)."""
    path = corpus._non_image_dicom(folder / "seg.dcm", "SEG", "1.2.840.10008.5.1.4.1.1.66.4")
    seg = pydicom.dcmread(path)
    seg.StudyInstanceUID = pydicom.dcmread(folder / "slice000.dcm").StudyInstanceUID
    seg.save_as(path)


def _one_mask(output_dir: Path) -> tuple[np.ndarray, sitk.Image]:
    (mask,) = (output_dir / "images" / SLUG).iterdir()
    image = sitk.ReadImage(str(mask))
    return sitk.GetArrayFromImage(image), image


@pytest.mark.parametrize(
    "make",
    [
        lambda d: corpus.write_image(corpus.small_ct(shape_zyx=(1, 40, 48)), d / "ct.mha"),
        lambda d: corpus.write_image(corpus.small_ct()[None], d / "ct.nii"),  # 3D stored as 4D with a last axis of one
        lambda d: corpus.write_image(corpus.small_ct(), d / "ct.mhd", compress=False),
        lambda d: corpus.write_image(corpus.small_ct(), d / "ct.nhdr", compress=False),
        lambda d: corpus.dicom_series(d / "oblique", edit=lambda i, ds: (setattr(ds, "ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 0.9848, -0.1736]),
                                                                       setattr(ds, "ImagePositionPatient", [0.0, 8.0 * i * 0.1736, 8.0 * i * 0.9848]))),
        lambda d: corpus.dicomdir_fileset(d / "fileset"),
        lambda d: (corpus.dicom_series(d / "mixed"), _seg_of_the_same_study(d / "mixed"),
                   (d / "mixed" / "notes.txt").write_text("not DICOM")),
    ],
    ids=["1-slice-volume", "4d-with-one-volume", "detached-mhd", "detached-nhdr", "dicom-oblique-10-degrees", "dicomdir-file-set", "dicom-series-beside-a-seg-and-junk"],
)
def test_unusual_but_valid_input_is_segmented_on_its_own_grid(tmp_path, capsys, make):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys)
    assert code == 0 and not errors, err
    mask, image = _one_mask(tmp_path / "out")
    assert image.GetPixelID() == sitk.sitkUInt8 and image.GetDimension() == 3
    case = json.loads((tmp_path / "out" / "results.json").read_text())["cases"][0]
    assert case["status"] == "succeeded" and list(mask.shape) == case["shape_zyx"]


def test_dicom_without_its_type_2_patient_attributes_is_segmented(tmp_path, capsys):
    def strip(index, ds):
        for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber"):
            delattr(ds, keyword)

    corpus.dicom_series(tmp_path / "in" / "s", edit=strip)
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys)
    assert code == 0 and not errors, err
    segs = list((tmp_path / "out").rglob("*.dcm"))
    assert len(segs) == 1 and pydicom.dcmread(segs[0]).PatientBirthDate == ""  # Type 2: present and empty


def test_oblique_dicom_keeps_its_tilted_direction(tmp_path, capsys):
    tilt = [1.0, 0.0, 0.0, 0.0, 0.9848, -0.1736]
    corpus.dicom_series(tmp_path / "in" / "oblique", edit=lambda i, ds: (setattr(ds, "ImageOrientationPatient", tilt),
                                                                        setattr(ds, "ImagePositionPatient", [0.0, 8.0 * i * 0.1736, 8.0 * i * 0.9848])))
    # .mha keeps the direction as read; NIfTI (the default for DICOM input) stores a quaternion, orthonormal, and this
    # IOP is not quite unit length (0.9848, -0.1736): its mask comes back orthonormalised, within 2e-5 (docs/inputs.md)
    code, _, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--format", "mha")
    assert code == 0, err
    _, image = _one_mask(tmp_path / "out")
    np.testing.assert_allclose(np.asarray(image.GetDirection()).reshape(3, 3)[:, 1], tilt[3:], atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), (4.0, 4.0, 8.0), atol=1e-3)


# --------------------------------------------------------------------------- a multi-case run


def test_in_a_folder_of_cases_each_bad_one_fails_alone_and_the_good_ones_are_written(tmp_path, capsys):
    d = tmp_path / "in"
    corpus.write_image(corpus.small_ct(1), d / "good-a.mha")
    corpus.dicom_series(d / "good-dicom")
    corpus.truncate(corpus.write_image(corpus.small_ct(), d / "truncated.nii.gz"))
    corpus.write_image(np.full((4, 40, 48), 7, np.int16), d / "constant.mha")
    (d / "huge.mha").write_bytes(corpus.mha_header((512, 512, 3000), data=b"\0" * 64))
    corpus.dicom_series(d / "mr", modality="MR")
    corpus.write_image(corpus.small_ct(2), d / "good-z.nii.gz")
    code, errors, err = run_cli(d, tmp_path / "out", capsys, "--memory-limit-gb", "6")
    assert code == BAD_INPUT, err  # the first failure's code (cases run in name order: constant first)
    cases = {c["case_id"]: c for c in json.loads((tmp_path / "out" / "results.json").read_text())["cases"]}
    assert {k for k, c in cases.items() if c["status"] == "succeeded"} == {"good-a", "good-z", "good-dicom"}
    failed = {k: c["error"] for k, c in cases.items() if c["status"] == "failed"}
    assert set(failed) == {"truncated", "constant", "huge", "mr"}
    assert "512x512x3000 voxels" in failed["huge"] and "GiB" in failed["huge"]
    assert len(errors) == 4 and all(any(f"error: {message}" == line for line in errors) for message in failed.values())
    written = sorted(p.name for p in (tmp_path / "out" / "images" / SLUG).iterdir())
    assert written == ["good-a.mha", "good-dicom.nii.gz", "good-z.nii.gz"]  # each in its input's format family


# ------------------------------------------------------------------------------ output problems


def test_output_that_cannot_be_a_folder_fails_up_front_with_code_5(tmp_path, capsys):
    corpus.write_image(corpus.small_ct(), tmp_path / "in" / "ct.mha")
    (tmp_path / "out").write_text("a file, not a folder")
    started = time.monotonic()
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys)
    assert code == OUTPUT and len(errors) == 1 and "not writable" in errors[0], err
    assert time.monotonic() - started < 30  # before the model and the case, not after


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0555) folder anyway; the container test runs as uid 1001")
def test_read_only_output_folder_fails_with_code_5(tmp_path, capsys):
    corpus.write_image(corpus.small_ct(), tmp_path / "in" / "ct.mha")
    (tmp_path / "out").mkdir(mode=0o555)
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys)
    assert code == OUTPUT and len(errors) == 1, err


DISK_FULL = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    sys.argv = ["process.py", *sys.argv[2:]]
    sys.path.insert(0, {repo!r})
    import process
    raise SystemExit(process.main())
""")


@pytest.mark.parametrize("limit_bytes", [4096, 1])
def test_disk_full_while_writing_fails_the_case_with_code_5_and_leaves_no_partial_file(tmp_path, limit_bytes):
    """RLIMIT_FSIZE in the child: every write past the limit fails with EFBIG (process.py ignores SIGXFSZ)."""
    corpus.write_image(corpus.small_ct(3, (12, 120, 140)), tmp_path / "in" / "a.mha")
    corpus.write_image(corpus.small_ct(4, (12, 120, 140)), tmp_path / "in" / "b.mha")
    done = subprocess.run([sys.executable, "-c", DISK_FULL.format(repo=str(REPO)), str(limit_bytes), "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "--threads", "1"], capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == OUTPUT, done.stderr
    assert len(errors) == 1 and ("File too large" in errors[0] or "not writable" in errors[0]), done.stderr
    assert not list((tmp_path / "out").rglob("*.mha")) and not list((tmp_path / "out").rglob(".partial-*")) and not list((tmp_path / "out").rglob(".probe-*"))


# ---------------------------------------------------------------------------------- time budget


def test_a_case_past_its_time_budget_is_stopped_and_the_next_case_still_runs(tmp_path, capsys, monkeypatch):
    corpus.write_image(corpus.small_ct(1), tmp_path / "in" / "a-slow.mha")
    corpus.write_image(corpus.small_ct(2), tmp_path / "in" / "b-fine.mha")
    real = process.read_ct

    def hangs_on_the_first_case(source, **kwargs):
        if Path(source).name == "a-slow.mha":
            while True:  # a Python-level hang (a stuck loop): the alarm interrupts it
                time.sleep(0.01)
        return real(source, **kwargs)

    monkeypatch.setattr(process, "read_ct", hangs_on_the_first_case)
    started = time.monotonic()
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--time-limit-s", "10")
    assert code == LIMIT, err
    assert len(errors) == 1 and "a-slow.mha: stopped after the time budget of 10 s" in errors[0], err
    assert time.monotonic() - started < 60
    assert [p.name for p in (tmp_path / "out" / "images" / SLUG).iterdir()] == ["b-fine.mha"]
    cases = {c["case_id"]: c["status"] for c in json.loads((tmp_path / "out" / "results.json").read_text())["cases"]}
    assert cases == {"a-slow": "failed", "b-fine": "succeeded"}


def test_a_case_whose_read_ahead_hangs_is_stopped_by_its_own_time_budget(tmp_path, capsys, monkeypatch):
    """The second case is read in the background while the first computes; a read that never ends there must
    still be stopped by that case's budget (the main thread waits on it), and must not keep the run from ending."""
    corpus.write_image(corpus.small_ct(1), tmp_path / "in" / "a-fine.mha")
    corpus.write_image(corpus.small_ct(2), tmp_path / "in" / "b-slow.mha")
    real, release = process.read_ct, threading.Event()

    def hangs_on_the_second_case(source, **kwargs):
        if Path(source).name == "b-slow.mha":
            release.wait()  # a read stuck until the test ends
        return real(source, **kwargs)

    monkeypatch.setattr(process, "read_ct", hangs_on_the_second_case)
    try:
        code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--time-limit-s", "10")
    finally:
        release.set()
    assert code == LIMIT, err
    assert len(errors) == 1 and "b-slow.mha: stopped after the time budget of 10 s" in errors[0], err
    assert [p.name for p in (tmp_path / "out" / "images" / SLUG).iterdir()] == ["a-fine.mha"]


def test_an_alarm_during_the_write_leaves_no_mask(tmp_path, capsys, monkeypatch):
    """The budget can run out after the mask is on disk: the case is then discarded whole, its mask removed."""
    corpus.write_image(corpus.small_ct(1), tmp_path / "in" / "ct.mha")
    real = process.write_label_map

    def write_then_overrun(*args, **kwargs):
        real(*args, **kwargs)
        time.sleep(60)

    monkeypatch.setattr(process, "write_label_map", write_then_overrun)
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--time-limit-s", "8")
    assert code == LIMIT and len(errors) == 1 and "stopped after the time budget of 8 s" in errors[0], err
    assert_nothing_partial(tmp_path / "out")


HANGS_IN_NATIVE_CODE = textwrap.dedent("""
    import signal, sys, time
    sys.path.insert(0, {repo!r})
    import process, preprocess.limits
    preprocess.limits.HARD_LIMIT_GRACE_S = 3.0

    def stuck(source, **kwargs):
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})  # as if inside a C call that never returns
        time.sleep(120)

    process.read_ct = stuck
    raise SystemExit(process.main(sys.argv[1:]))
""")


def test_a_case_stuck_in_native_code_is_reported_and_the_process_exits_7(tmp_path):
    corpus.write_image(corpus.small_ct(1), tmp_path / "in" / "ct.mha")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HANGS_IN_NATIVE_CODE.format(repo=str(REPO)), "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "--threads", "1", "--time-limit-s", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == LIMIT, done.stderr
    assert time.monotonic() - started < 60
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stuck in native code" in errors[0], done.stderr
    cases = json.loads((tmp_path / "out" / "results.json").read_text())["cases"]
    assert [c["status"] for c in cases] == ["failed"]
    assert_nothing_partial(tmp_path / "out")


# ------------------------------------------------------------------------ memory budget up front


def test_a_volume_too_large_for_the_budget_is_refused_from_its_header_with_its_size(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "huge.mha").write_bytes(corpus.mha_header((512, 512, 3000), data=b"\0" * 64))  # data missing: never read
    started = time.monotonic()
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--memory-limit-gb", "6")
    assert code == LIMIT, err
    assert len(errors) == 1 and "huge.mha: 512x512x3000 voxels (786 M) would need about" in errors[0] and "6.0 GiB budget of --memory-limit-gb" in errors[0]
    assert time.monotonic() - started < 30


def test_the_same_volume_fits_a_larger_budget_and_fails_only_on_its_missing_data(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "huge.mha").write_bytes(corpus.mha_header((512, 512, 3000), data=b"\0" * 64))
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--memory-limit-gb", "64")
    assert code == BAD_INPUT and len(errors) == 1 and "huge.mha: cannot be read" in errors[0], err


def test_a_dicom_series_too_large_for_the_budget_is_refused_before_its_pixels_are_decoded(tmp_path, capsys, monkeypatch):
    corpus.dicom_series(tmp_path / "in" / "s", n=6)
    import preprocess.limits

    monkeypatch.setattr(preprocess.limits, "PEAK_BYTES_PER_VOXEL", 10**9)
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys, "--memory-limit-gb", "4")
    assert code == LIMIT and len(errors) == 1 and "48x40x6 voxels" in errors[0], err


def test_memory_limit_comes_from_the_cgroup_when_there_is_one(tmp_path, monkeypatch):
    import preprocess.limits as limits

    cgroup = tmp_path / "memory.max"
    cgroup.write_text("4294967296\n")
    monkeypatch.setattr(limits, "_CGROUP_LIMITS", (cgroup,))
    assert limits.detect_memory_limit() == (4 * 2**30, f"the container's memory limit ({cgroup})")
    cgroup.write_text("max\n")
    assert limits.detect_memory_limit()[1] == "the machine's physical memory"


def test_unexpected_exception_in_a_case_is_one_line_code_1_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    corpus.write_image(corpus.small_ct(1), tmp_path / "in" / "a.mha")
    corpus.write_image(corpus.small_ct(2), tmp_path / "in" / "b.mha")
    real = process.read_ct

    def broken_on_a(source, **kwargs):
        if Path(source).name == "a.mha":
            raise ZeroDivisionError("a bug\nspanning lines")
        return real(source, **kwargs)

    monkeypatch.setattr(process, "read_ct", broken_on_a)
    code, errors, err = run_cli(tmp_path / "in", tmp_path / "out", capsys)
    assert code == 1 and len(errors) == 1 and "a.mha: unexpected ZeroDivisionError: a bug spanning lines" in errors[0], err
    assert [p.name for p in (tmp_path / "out" / "images" / SLUG).iterdir()] == ["b.mha"]


HANGS_UNTIL_TERMINATED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import process
    real = process.read_ct

    def slow(source, **kwargs):
        if source.name == "a.mha":
            print("reading", file=sys.stderr, flush=True)
            time.sleep(120)
        return real(source, **kwargs)

    process.read_ct = slow
    raise SystemExit(process.main(sys.argv[1:]))
""")


def test_sigterm_discards_the_case_in_progress_reports_it_and_exits_143(tmp_path):
    """What a platform does at its time limit (SIGTERM, then SIGKILL later): the run stops cleanly."""
    corpus.write_image(corpus.small_ct(1), tmp_path / "in" / "a.mha")
    corpus.write_image(corpus.small_ct(2), tmp_path / "in" / "b.mha")
    child = subprocess.Popen([sys.executable, "-c", HANGS_UNTIL_TERMINATED.format(repo=str(REPO)), "--input", str(tmp_path / "in"),
                              "--output", str(tmp_path / "out"), "--threads", "1"], stderr=subprocess.PIPE, text=True)
    for line in child.stderr:  # wait until the case is under way
        if line.startswith("reading"):
            break
    child.terminate()
    err = child.stderr.read()
    assert child.wait(timeout=60) == 143, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: stopped by SIGTERM: the case in progress was discarded"], err
    cases = json.loads((tmp_path / "out" / "results.json").read_text())["cases"]
    assert [(c["case_id"], c["status"]) for c in cases] == [("a", "failed")]  # b was not started
    assert_nothing_partial(tmp_path / "out")


def test_main_called_from_a_worker_thread_runs_without_its_signal_handlers(tmp_path):
    """Signal handlers can only be installed in the main thread; an embedding that calls main() elsewhere still works."""
    import threading

    corpus.write_image(corpus.small_ct(1), tmp_path / "in" / "a.mha")
    codes = []
    worker = threading.Thread(target=lambda: codes.append(process.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                                                           "--threads", "1"])))
    worker.start()
    worker.join(timeout=300)
    assert codes == [0]
    assert [p.name for p in (tmp_path / "out" / "images" / SLUG).iterdir()] == ["a.mha"]
