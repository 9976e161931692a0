"""common/atomic.py: a file appears whole under its name or not at all, whatever interrupts the write."""

from __future__ import annotations

import json
import os
import stat

import pytest

from common.atomic import atomic_path, write_json_atomically, write_text_atomically
from common.errors import OutputError


def test_the_file_appears_whole_with_mode_0644_and_no_temporary_left(tmp_path):
    target = tmp_path / "deep" / "results.json"
    write_json_atomically(target, {"cases": [1, 2]})
    assert json.loads(target.read_text()) == {"cases": [1, 2]}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_the_temporary_name_keeps_the_suffixes_that_pick_a_writer(tmp_path):
    with atomic_path(tmp_path / "case.nii.gz") as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".partial-") and temp.name.endswith("-case.nii.gz")
        temp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, ValueError, TimeoutError])
def test_an_interrupted_write_leaves_neither_the_file_nor_its_temporary(tmp_path, interruption):
    (tmp_path / "old.txt").write_text("keep")
    with pytest.raises(interruption):
        with atomic_path(tmp_path / "new.txt") as temp:
            temp.write_text("half")
            raise interruption()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]


def test_an_existing_file_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomically(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_text("sec")
            raise RuntimeError("stopped")
    assert target.read_text() == "first"


def test_a_folder_that_cannot_be_written_is_an_output_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=str(blocker)):
        write_text_atomically(blocker / "x.txt", "x")


def test_a_non_finite_number_is_never_written(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomically(tmp_path / "m.json", {"dice": float("nan")})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_is_an_output_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError):
            write_text_atomically(tmp_path / "x.txt", "x")
    finally:
        tmp_path.chmod(0o755)


def test_a_hard_link_onto_the_same_file_leaves_no_temporary(tmp_path):
    """rename() of two links to one file does nothing (POSIX): the temporary name must still go."""
    target = tmp_path / "table.txt"
    write_text_atomically(target, "colours")
    with atomic_path(target) as temp:
        os.link(target, temp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.txt"] and target.read_text() == "colours"
