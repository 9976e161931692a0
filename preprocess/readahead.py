"""Reading the next case's CT while the current one computes (runs with several cases).

One worker thread reads case k+1 as soon as case k has been read, so that its decompression and decoding
(about 2 s for a 512x512x300 .nii.gz) overlap case k's network time. It is an optimisation only and never
changes what a case gives:
- it reads ahead only if the next volume fits the memory budget beside the case in progress (that case's
  estimated peak is held back); if not, the next case is read when its turn comes, with the whole budget;
- an error met while reading ahead is raised when that case's turn comes, in that case's own handling,
  exactly as if it had been read then.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np

from preprocess.geometry import Geometry
from preprocess.io import read_ct
from preprocess.limits import PEAK_BYTES_PER_VOXEL, MemoryBudget, estimate_peak_bytes

Read = Callable[..., tuple[np.ndarray, Geometry]]


class _NoRoomYet(Exception):
    """The volume does not fit beside the case in progress: read it later, with the whole budget."""


class ReadAhead:
    """`read(source)` gives a case's (volume_zyx, geometry), read ahead by `start` where that was possible.

    A context manager: leaving it drops what was read ahead and not taken.
    """

    def __init__(self, *, budget: MemoryBudget | None, read: Read = read_ct):
        self.budget = budget
        self._read = read
        self._pending: dict[object, Future] = {}  # by source: a path, or a series a study chose (preprocess.dicom.DicomSeries)

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self._pending.clear()  # a read still running ends with its daemon thread; nothing waits for it

    def read(self, source: Path) -> tuple[np.ndarray, Geometry]:
        """The CT of `source`: the one read ahead (or its error), else read now against the whole budget."""
        future = self._pending.pop(source, None)
        if future is not None:
            try:
                return future.result()
            except _NoRoomYet:
                pass
        return self._read(source, check_size=self.budget.check if self.budget else None)

    def start(self, source: Path, *, beside: tuple[np.ndarray, Geometry]) -> None:
        """Begin reading `source` in the background, beside the case in progress (its volume and geometry)."""
        if source in self._pending:
            return
        check = None
        if self.budget is not None:
            volume, geometry = beside
            # the in-memory voxel size stands in for the file's: at least as large (int16 or float32 HU)
            held = estimate_peak_bytes(geometry.size_xyz, stored_bytes_per_voxel=volume.itemsize)
            check = _room_check(self.budget, held)
        future: Future = Future()

        def work() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self._read(source, check_size=check))
            except BaseException as error:  # handed to the case's turn, raised there
                future.set_exception(error)

        # a daemon thread, not an executor's: a read stuck in native code (or a hung file system) must neither
        # keep the process from exiting nor escape the case's time budget, which the main thread enforces
        threading.Thread(target=work, name=f"trunkseg-read-ahead-{getattr(source, 'name', source)}", daemon=True).start()
        self._pending[source] = future


def _room_check(budget: MemoryBudget, held_bytes: int):
    """A size check for reading ahead: the volume (and its label map to come) must fit in the budget less `held_bytes`."""

    def check(size_xyz: tuple[int, ...], *, stored_bytes_per_voxel: int, source: Path) -> None:
        voxels = int(np.prod(np.asarray(size_xyz, dtype=np.int64)))
        budget.check(size_xyz, stored_bytes_per_voxel=stored_bytes_per_voxel, source=source)  # too big even alone: its error
        if held_bytes + voxels * (PEAK_BYTES_PER_VOXEL + stored_bytes_per_voxel) > budget.limit_bytes:
            raise _NoRoomYet(str(source))

    return check

