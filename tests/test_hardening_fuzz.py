"""Bounded coverage-guided fuzzing of the readers and inputs.json (benchmarks/fuzz_inputs.py, atheris), and its finds.

Each target runs for FUZZ_SECONDS in its own process (libFuzzer stops there; a crash, a hang or an
exception other than TrunkSegError fails the run and the input is kept as an artifact in tmp_path).
`TRUNKSEG_FUZZ_SECONDS` lengthens the run. Without atheris these skip (CI installs it: requirements/dev.txt).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from preprocess.dicom import read_dicom_series
from common.errors import InputError
from tests.conftest import REPO

FUZZ_SECONDS = int(os.environ.get("TRUNKSEG_FUZZ_SECONDS", "12"))


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must fuzz: atheris is in requirements/dev.txt")
        return False
    return True


@pytest.mark.parametrize("target", ["inputs-json", "image", "dicom"])
def test_fuzzing_for_a_bounded_time_finds_no_crash_and_no_stray_exception(target, tmp_path):
    # RSS bound = the product's stated CPU memory bound (6 GiB): a clean-clone run once saw the DICOM target at 3.3 GiB
    if not _atheris_available():
        pytest.skip("atheris is not installed (pip install -r requirements/dev.txt)")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fuzz_inputs.py"), target, f"-max_total_time={FUZZ_SECONDS}", "-timeout=20",
         "-rss_limit_mb=6144", f"-artifact_prefix={tmp_path}/", "-seed=1", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 120,
    )
    tail = "\n".join(done.stderr.splitlines()[-30:])
    assert done.returncode == 0, f"fuzz target {target} failed (artifacts in {tmp_path}):\n{tail}"
    assert "Done" in done.stderr and "runs in" in done.stderr, tail
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]


def test_a_dicom_file_meta_element_of_odd_length_is_not_dicom_not_a_crash(tmp_path):
    """Found by the dicom target: pydicom raises BytesLengthException (not a ValueError) for it."""
    data = b"\0" * 128 + b"DICM" + struct.pack("<HH2sH", 2, 0, b"UL", 3) + b"\x01\x02\x03" + b"\0" * 64
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.dcm").write_bytes(data)
    with pytest.raises(InputError, match="no CT image slices found"):
        read_dicom_series(tmp_path / "s")


@pytest.mark.parametrize("vox_offset", [float("nan"), float("inf"), 0.0, 348.0])
def test_a_nifti_header_with_a_bad_vox_offset_is_refused_or_read_as_written_never_a_stray_exception(tmp_path, vox_offset):
    """NaN found by the image target within seconds of adding the truncated-NIfTI length check; ITK reads every
    offset below 352 from elsewhere, shifted (found when this test stopped accepting any finite volume)."""
    import numpy as np

    from preprocess.io import read_ct
    from tests import hardening_corpus as corpus

    written = corpus.small_ct()
    path = corpus.write_image(written, tmp_path / "ct.nii", compress=False)
    data = bytearray(path.read_bytes())
    data[108:112] = struct.pack("<f", vox_offset)
    path.write_bytes(bytes(data))
    try:
        volume, geometry = read_ct(path)
    except InputError:
        return
    # read: then it must be the voxels written, not bytes from some other offset
    assert volume.shape == geometry.shape_zyx == written.shape
    np.testing.assert_array_equal(volume, written.astype(volume.dtype))


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
@pytest.mark.parametrize("reader", ["algorithm", "evaluation"])
def test_a_nifti_whose_sform_in_use_holds_a_nan_is_refused_not_a_hang(tmp_path, name, reader):
    """Found by the image target: ITK's NIfTI reader never returns from such a header (measured: > 120 s, no error).

    Read in a child process with a deadline, so that a regression fails here instead of hanging the test run.
    """
    import gzip

    from tests import hardening_corpus as corpus

    plain = corpus.write_image(corpus.small_ct(shape_zyx=(2, 12, 10)), tmp_path / "plain.nii", compress=False)
    data = bytearray(plain.read_bytes())
    data[254:256] = struct.pack("<h", 1)  # sform_code: in use
    # the fuzz find's sform: a degenerate rotation (first row denormal) and a NaN offset; either alone does not hang
    data[280:328] = struct.pack("<12f", -0.0, 8.96831e-44, 9.10844e-44, 0.0, 0.0, 0.0, 0.0, float("nan"), 0.0, 0.0, 8.0, 0.0)
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
    if reader == "algorithm":
        code = f"from pathlib import Path; from preprocess.io import read_ct; read_ct(Path({str(path)!r}))"
    else:  # the evaluation reads a prediction on the grid of a (good) ground truth
        annotated = np.zeros((2, 12, 10), np.uint8)
        annotated[1, 4:8, 3:6] = 1
        truth = corpus.write_image(annotated, tmp_path / "truth.nii.gz")
        code = (f"from pathlib import Path; from evaluation.labels import canonical_label_set; "
                f"from evaluation.volumes import read_annotated_slices, read_slices_on_truth_grid; "
                f"truth = read_annotated_slices(Path({str(truth)!r}), canonical_label_set()); "
                f"read_slices_on_truth_grid(Path({str(path)!r}), truth, case_id='c', what='prediction')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode != 0 and "InputError" in done.stderr and "sform holds a non-finite number" in done.stderr, done.stderr[-500:]


def test_only_nifti_1_headers_are_handed_to_the_reader(tmp_path):
    """A .nii whose header size is neither 348 (NIfTI-1) nor 540 (NIfTI-2) is not NIfTI; NIfTI-2 gets its own reason."""
    from preprocess.io import check_nifti_header
    from tests import hardening_corpus as corpus

    path = corpus.write_image(corpus.small_ct(shape_zyx=(2, 12, 10)), tmp_path / "ct.nii", compress=False)
    check_nifti_header(path)  # a good one passes
    data = bytearray(path.read_bytes())
    for size, reason in ((292, "not a NIfTI-1 header"), (540, "NIfTI-2")):
        data[:4] = struct.pack("<i", size)
        path.write_bytes(bytes(data))
        with pytest.raises(InputError, match=reason):
            check_nifti_header(path)
    data[:4] = struct.pack("<i", 348)
    path.write_bytes(bytes(data[:200]))  # NIfTI-1 by its first bytes, but shorter than its header
    with pytest.raises(InputError, match="not a NIfTI-1 header"):
        check_nifti_header(path)


@pytest.mark.parametrize("ndims", ["366666666666666666666666666666666660 1 0 0 0 1", "-3", "1000", "\u00b2"])
def test_a_metaimage_with_an_absurd_ndims_is_refused_not_a_segfault(tmp_path, ndims):
    """Found by the image target: ITK's MetaImage reader dies of SIGSEGV on NDims >= ~100 or < 0 (measured).

    Read in a child process, so that a regression fails here instead of killing the test run.
    """
    from tests import hardening_corpus as corpus

    path = corpus.write_image(corpus.small_ct(shape_zyx=(2, 12, 10)), tmp_path / "ct.mha", compress=False)
    data = path.read_bytes()
    assert b"NDims = 3\n" in data
    path.write_bytes(data.replace(b"NDims = 3\n", f"NDims = {ndims}\n".encode("latin-1"), 1))  # as the reader decodes it
    for code in (f"from pathlib import Path; from preprocess.io import read_ct; read_ct(Path({str(path)!r}))",
                 f"from pathlib import Path; from preprocess.io import read_image; read_image(Path({str(path)!r}))"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 1 and "not a dimension count" in done.stderr, (done.returncode, done.stderr[-500:])


@pytest.mark.parametrize("damage", ["250 MB declared, 40 bytes there", "half the pixel data", "no pixel data"])
def test_a_dicom_slice_whose_pixel_data_is_missing_or_overdeclared_is_refused_before_gdcm(tmp_path, damage):
    """Found by the dicom target: a 1 kB slice declaring 250 MB of pixel data made GDCM take 3.3 GB and 5 s (measured)."""
    import resource

    from preprocess.dicom import read_dicom_series
    from tests import hardening_corpus as corpus

    folder = corpus.dicom_series(tmp_path / "series", n=3)
    path = sorted(folder.iterdir())[1]
    data = path.read_bytes()
    tag = b"\xe0\x7f\x10\x00OW\x00\x00"  # (7FE0,0010) OW, explicit little endian: a 4-byte length follows
    at = data.rindex(tag) + len(tag)
    if damage == "no pixel data":
        path.write_bytes(data[: at - len(tag)])
    elif damage == "half the pixel data":
        path.write_bytes(data[: at + 4 + (len(data) - at - 4) // 2])
    else:  # the fuzz find's shape
        path.write_bytes(data[:at] + struct.pack("<I", 0x0F000000) + data[at + 4 : at + 44])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=f"{path.name}: (no pixel data|pixel data holds .* truncated|element \\(7FE0,0010\\) declares .* holds .*: truncated)"):
        read_dicom_series(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: GDCM never got the file


def test_a_dicom_attribute_with_an_unknown_vr_is_named_not_a_stray_exception(tmp_path):
    """Found by the dicom target: pydicom converts values lazily and raises NotImplementedError for an unknown VR."""
    from preprocess.dicom import read_dicom_series
    from tests import hardening_corpus as corpus

    folder = corpus.dicom_series(tmp_path / "series", n=3)
    path = sorted(folder.iterdir())[1]
    data = path.read_bytes()
    element = b"\x18\x00\x50\x00DS"  # (0018,0050) SliceThickness, explicit VR little endian
    assert data.count(element) == 1
    path.write_bytes(data.replace(element, b"\x18\x00\x50\x00\x44\xab"))
    with pytest.raises(InputError, match=f"{path.name}: its DICOM attribute SliceThickness cannot be read"):
        read_dicom_series(folder)


def test_a_private_element_with_an_unknown_vr_is_refused_before_gdcm_allocates_its_misread_length(tmp_path):
    """Found by the dicom target (CI, then here): pydicom reads a 2-byte length after an unknown VR, GDCM a 4-byte
    one, so a 4.7 kB slice with a private element of VR 'D(' made SimpleITK allocate 1.2 GB (measured); the fuzz run
    grew to its 6 GB limit. The element is private: no attribute this product reads names it."""
    import resource

    from pydicom.dataset import Dataset

    from preprocess.dicom import read_dicom_series
    from tests import hardening_corpus as corpus

    def add_private(index: int, dataset: Dataset) -> None:
        dataset.add_new(0x53200010, "LO", "abcd")

    folder = corpus.dicom_series(tmp_path / "series", n=3, edit=add_private)
    path = sorted(folder.iterdir())[1]
    element = b"\x20\x53\x10\x00LO\x04\x00"  # (5320,0010) LO, length 4
    data = path.read_bytes()
    assert data.count(element) == 1
    path.write_bytes(data.replace(element, b"\x20\x53\x10\x00D(\x04\x00"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=rf"{path.name}: element \(5320,0010\) has the value representation 'D\('"):
        read_dicom_series(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: GDCM never got the file


def test_an_implicit_vr_series_with_sequences_and_private_elements_still_reads(tmp_path):
    """The VR check must not refuse what the standard allows: implicit VR (no VR in the file), a sequence, a
    private element the data dictionary does not know."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian

    from preprocess.dicom import read_dicom_series
    from tests import hardening_corpus as corpus

    def make_implicit(index: int, dataset: Dataset) -> None:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
        item.add_new(0x00091001, "LO", "private in an item")
        dataset.ReferencedImageSequence = Sequence([item])
        dataset.add_new(0x00091002, "LO", "private")
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    folder = corpus.dicom_series(tmp_path / "series", n=3, edit=make_implicit)
    volume, geometry = read_dicom_series(folder)
    assert volume.shape == geometry.shape_zyx == (3, 40, 48)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "tests" / "fuzz_finds").glob("*.dcm")))
def test_each_stored_dicom_fuzz_find_is_refused_with_one_named_input_error(tmp_path, name):
    """The fuzz finds kept byte for byte (tests/fuzz_finds/README.md): each is an InputError naming the input, read
    in well under the memory the misread length asked for."""
    import resource
    import shutil

    from preprocess.dicom import read_dicom_series

    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(REPO / "tests" / "fuzz_finds" / name, folder / "slice.dcm")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=f"^{folder}"):  # the folder, or the file in it
        read_dicom_series(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "tests" / "fuzz_finds").iterdir() if p.name != "README.md"))
def test_each_stored_fuzz_find_passes_its_target_in_a_child_process(tmp_path, name):
    """Every find, through the very harness that found it (a segmentation fault kills only the child): the target
    returns, i.e. the reader read it or raised TrunkSegError. The file's name begins with its target."""
    if not _atheris_available():
        pytest.skip("atheris is not installed (pip install -r requirements/dev.txt)")
    target = next(t for t in ("inputs-json", "image", "dicom") if name.startswith(f"{t}-"))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fuzz_inputs.py"), target, str(REPO / "tests" / "fuzz_finds" / name)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, f"{name} through the {target} target: exit {done.returncode}\n{done.stderr[-2000:]}"
