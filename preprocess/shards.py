"""Which cases a shard of a run takes: a stable assignment by case id, and the shard a scheduler gave us.

A run over thousands of cases is split into N shards, each its own process (a Slurm array task, a
Kubernetes Indexed Job completion) with its own output folder; `python -m postprocess.merge` joins them.

Assignment: case `c` goes to shard `int(sha256(c)[:8 bytes]) mod N` (big-endian), shards numbered 0..N-1.
It depends on the case id only, never on the other cases or on the order the folder lists them, so
adding or removing cases moves no other case to another shard, and every process of the run agrees
without talking to the others. (Changing N reassigns most cases: finish a run with the N it began with.)
With few cases the shards are uneven, and a shard may get none: it then writes an empty results.json.

Where the shard comes from, first match wins:
1. `--shard I/N` (0 <= I < N);
2. Slurm job arrays: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, the index counted from
   SLURM_ARRAY_TASK_MIN in steps of SLURM_ARRAY_TASK_STEP (so `--array=1-4` and `--array=0-3` both work);
3. Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX, with the count from `--shard-count` or
   TRUNKSEG_SHARD_COUNT (Kubernetes does not tell the pod its Job's `completions`; the manifest sets it).
Without any of them the run is not sharded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import UsageError


@dataclass(frozen=True)
class Shard:
    index: int  # 0 .. count - 1
    count: int
    assigned_by: str  # "--shard", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(f"shard {self.index}/{self.count} ({self.assigned_by}): needs a count >= 1 and 0 <= index < count")

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def takes(self, case_id: str) -> bool:
        return assign_shard(case_id, self.count) == self.index


def assign_shard(case_id: str, count: int) -> int:
    """The shard (0 .. count-1) that a case belongs to; depends on the case id alone."""
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_cases(cases: Sequence, shard: Shard | None) -> tuple:
    """The cases (anything with a `case_id`) this shard takes, in their given order; all of them without a shard."""
    return tuple(cases) if shard is None else tuple(c for c in cases if shard.takes(c.case_id))


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UsageError(f"{what}={text!r} is not a whole number") from None


def parse_shard(text: str) -> Shard:
    """`I/N` as given to --shard."""
    index, slash, count = text.partition("/")
    if not slash:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four shards")
    return Shard(_integer(index, "--shard index"), _integer(count, "--shard count"), "--shard")


def choose_shard(requested: str | None, *, count: int | None, environ: Mapping[str, str]) -> Shard | None:
    """The shard of this process (module docstring for the order), or None for an unsharded run."""
    if requested:
        shard = parse_shard(requested)
        if count is not None and count != shard.count:
            raise UsageError(f"--shard {requested} and a shard count of {count} disagree")
        return shard
    if environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        task = _integer(environ["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID")
        tasks = _integer(environ.get("SLURM_ARRAY_TASK_COUNT", ""), "SLURM_ARRAY_TASK_COUNT")
        first = _integer(environ.get("SLURM_ARRAY_TASK_MIN", "0") or "0", "SLURM_ARRAY_TASK_MIN")
        step = _integer(environ.get("SLURM_ARRAY_TASK_STEP", "1") or "1", "SLURM_ARRAY_TASK_STEP")
        if step < 1 or (task - first) % step:
            raise UsageError(f"SLURM_ARRAY_TASK_ID={task} is not SLURM_ARRAY_TASK_MIN={first} plus a multiple of SLURM_ARRAY_TASK_STEP={step}")
        if count is not None and count != tasks:
            raise UsageError(f"the Slurm array has {tasks} tasks but the shard count is {count}")
        return Shard((task - first) // step, tasks, "SLURM_ARRAY_TASK_ID")
    if environ.get("JOB_COMPLETION_INDEX", "").strip():
        index = _integer(environ["JOB_COMPLETION_INDEX"], "JOB_COMPLETION_INDEX")
        if count is None:
            raise UsageError(f"JOB_COMPLETION_INDEX={index} is set but not the number of shards: pass --shard-count N or set "
                             f"TRUNKSEG_SHARD_COUNT to the Job's completions")
        return Shard(index, count, "JOB_COMPLETION_INDEX")
    return None
