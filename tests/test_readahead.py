"""Reading the next case ahead: the same volume or the same error as reading it in turn, and never past the memory budget."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError, MemoryBudgetError
from preprocess.geometry import Geometry
from preprocess.limits import PEAK_BYTES_PER_VOXEL, PEAK_FIXED_BYTES, MemoryBudget
from preprocess.readahead import ReadAhead

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SIZE_XYZ = (64, 48, 10)


class FakeReader:
    """read_ct's contract: the size check first (it may raise), then the volume; records who read what, in which thread."""

    def __init__(self, failing: set[str] = frozenset()):
        self.calls: list[tuple[str, str]] = []
        self.failing = failing

    def __call__(self, source, *, check_size=None):
        self.calls.append((Path(source).name, threading.current_thread().name))
        if check_size is not None:
            check_size(SIZE_XYZ, stored_bytes_per_voxel=2, source=Path(source))
        if Path(source).name in self.failing:
            raise InputError(f"{source}: not a CT")
        volume = np.full(SIZE_XYZ[::-1], len(self.calls), np.int16)
        return volume, Geometry(size_xyz=SIZE_XYZ, spacing_mm=(1.0, 1.0, 2.0), origin_mm=(0.0, 0.0, 0.0), direction=LPS)


def _need(voxels: int = int(np.prod(SIZE_XYZ))) -> int:
    return PEAK_FIXED_BYTES + voxels * (PEAK_BYTES_PER_VOXEL + 2)


def test_the_next_case_is_read_in_the_background_once_and_handed_over():
    fake = FakeReader()
    with ReadAhead(budget=MemoryBudget(4 * _need(), "test"), read=fake) as reader:
        first = reader.read(Path("a.mha"))
        reader.start(Path("b.mha"), beside=first)
        second = reader.read(Path("b.mha"))
    assert [name for name, _ in fake.calls] == ["a.mha", "b.mha"]  # b read once, ahead
    assert fake.calls[1][1].startswith("trunkseg-read-ahead") and fake.calls[0][1] == threading.current_thread().name
    assert second[0].shape == SIZE_XYZ[::-1] and second[1].size_xyz == SIZE_XYZ


def test_an_error_while_reading_ahead_is_that_cases_own_error_in_its_turn():
    fake = FakeReader(failing={"bad.mha"})
    with ReadAhead(budget=None, read=fake) as reader:
        reader.start(Path("bad.mha"), beside=fake("a.mha"))
        with pytest.raises(InputError, match="bad.mha: not a CT"):
            reader.read(Path("bad.mha"))


def test_a_volume_without_room_beside_the_case_in_progress_is_read_in_its_turn_with_the_whole_budget():
    fake = FakeReader()
    budget = MemoryBudget(_need() + 1000, "test")  # one case fits, two do not
    with ReadAhead(budget=budget, read=fake) as reader:
        first = reader.read(Path("a.mha"))
        reader.start(Path("b.mha"), beside=first)
        reader.read(Path("b.mha"))
    assert [name for name, _ in fake.calls] == ["a.mha", "b.mha", "b.mha"]  # tried ahead, then read in turn
    assert fake.calls[2][1] == threading.current_thread().name


def test_a_volume_too_big_for_the_budget_alone_is_refused_in_its_turn():
    fake = FakeReader()
    with ReadAhead(budget=MemoryBudget(_need() - 1, "test"), read=fake) as reader:
        reader.start(Path("b.mha"), beside=(np.zeros((1, 1, 1), np.int16), Geometry(size_xyz=(1, 1, 1), spacing_mm=(1.0, 1.0, 1.0),
                                                                                    origin_mm=(0.0, 0.0, 0.0), direction=LPS)))
        with pytest.raises(MemoryBudgetError, match="b.mha"):
            reader.read(Path("b.mha"))
