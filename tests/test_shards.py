"""Which shard takes which case, and where the shard of a process comes from (preprocess/shards.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest

from common.errors import UsageError
from preprocess.shards import Shard, choose_shard, parse_shard, select_cases, assign_shard


@dataclass(frozen=True)
class FakeCase:  # select_cases needs only a case_id
    case_id: str


def _ids(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"sub-{rng.integers(10**9):09d}_ct" for _ in range(n)]


def test_every_case_lands_in_exactly_one_shard_whatever_the_count():
    cases = [FakeCase(i) for i in _ids(500)]
    for count in (1, 2, 3, 4, 7, 16):
        taken = [c.case_id for index in range(count) for c in select_cases(cases, Shard(index, count, "--shard"))]
        assert sorted(taken) == sorted(c.case_id for c in cases)


def test_adding_and_reordering_cases_moves_no_case_to_another_shard():
    old = _ids(300, seed=1)
    new = list(reversed(old + _ids(200, seed=2)))  # more cases, listed in another order
    for count in (2, 4, 10):
        before = {c: i for i in range(count) for c in (x.case_id for x in select_cases([FakeCase(c) for c in old], Shard(i, count, "t")))}
        after = {c: i for i in range(count) for c in (x.case_id for x in select_cases([FakeCase(c) for c in new], Shard(i, count, "t")))}
        assert all(after[c] == before[c] for c in old)


def test_the_assignment_is_the_documented_hash_so_any_tool_can_reproduce_it():
    # the docs' recipe, written out independently: first 8 bytes of sha256(id), big-endian, mod N
    for case_id in ("case-00", "ÄÖ/ü", "x" * 300):
        digest = hashlib.sha256(case_id.encode("utf-8")).hexdigest()
        assert assign_shard(case_id, 4) == int(digest[:16], 16) % 4
    assert [assign_shard(f"case-{i:02d}", 4) for i in range(8)] == [2, 3, 3, 1, 2, 0, 0, 2]  # computed with sha256sum in a shell


def test_shards_are_even_for_many_cases():
    counts = np.bincount([assign_shard(c, 8) for c in _ids(8000, seed=3)], minlength=8)
    assert counts.min() > 0.9 * 1000 and counts.max() < 1.1 * 1000, counts


def test_order_within_a_shard_is_the_runs_order():
    cases = [FakeCase(c) for c in _ids(100, seed=4)]
    taken = select_cases(cases, Shard(1, 3, "t"))
    positions = [cases.index(c) for c in taken]
    assert positions == sorted(positions)


@pytest.mark.parametrize("text", ["3", "4/4", "-1/4", "a/4", "1/0", "1/b"])
def test_a_bad_shard_argument_is_a_usage_error_naming_it(text):
    with pytest.raises(UsageError, match="shard"):
        parse_shard(text)


def test_an_explicit_shard_wins_over_the_schedulers_variables():
    shard = choose_shard("1/4", count=None, environ={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "JOB_COMPLETION_INDEX": "5"})
    assert (shard.index, shard.count, shard.assigned_by) == (1, 4, "--shard")


@pytest.mark.parametrize("array, task, expected", [
    ({"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1"}, "2", 2),  # --array=0-3
    ({"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "1"}, "4", 3),  # --array=1-4
    ({"SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "5"}, "20", 2),  # --array=10-25:5
    ({}, "1", 1),  # an old Slurm without MIN/STEP
])
def test_a_slurm_array_task_is_counted_from_the_arrays_first_index(array, task, expected):
    shard = choose_shard(None, count=None, environ={"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "4", **array})
    assert (shard.index, shard.count, shard.assigned_by) == (expected, 4, "SLURM_ARRAY_TASK_ID")


def test_a_slurm_task_off_the_arrays_step_is_refused():
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_STEP"):
        choose_shard(None, count=None, environ={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
                                               "SLURM_ARRAY_TASK_STEP": "2"})


def test_a_kubernetes_index_needs_the_count_and_says_where_to_give_it():
    with pytest.raises(UsageError, match="TRUNKSEG_SHARD_COUNT"):
        choose_shard(None, count=None, environ={"JOB_COMPLETION_INDEX": "2"})
    shard = choose_shard(None, count=5, environ={"JOB_COMPLETION_INDEX": "2"})
    assert (shard.index, shard.count, shard.assigned_by) == (2, 5, "JOB_COMPLETION_INDEX")
    with pytest.raises(UsageError, match="0 <= index < count"):
        choose_shard(None, count=2, environ={"JOB_COMPLETION_INDEX": "2"})


def test_no_scheduler_and_no_argument_is_an_unsharded_run():
    assert choose_shard(None, count=None, environ={"SLURM_JOB_ID": "17", "JOB_COMPLETION_INDEX": ""}) is None
