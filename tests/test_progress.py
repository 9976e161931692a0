"""The [k/N] progress lines (postprocess/progress.py): counts, and the estimate of the time left."""

from __future__ import annotations

from postprocess.progress import Progress, format_duration


def test_the_estimate_is_the_mean_case_time_times_the_cases_left_and_skips_cost_nothing():
    lines: list[str] = []
    progress = Progress(4, log=lines.append, terminal=False)
    progress.case_ended("b", seconds=0.0, outcome="skipped")
    progress.case_ended("a", seconds=10.0)
    progress.case_ended("c", seconds=30.0, outcome="failed")
    progress.case_ended("d", seconds=5.0)
    assert lines == [
        "[1/4] case b skipped (already complete), 3 left, no estimate yet",
        "[2/4] case a done in 10.0 s, about 20 s left",
        "[3/4] case c failed in 30.0 s, about 20 s left",
        "[4/4] case d done in 5.0 s, none left",
    ]


def test_durations_are_rounded_for_a_person():
    assert [format_duration(s) for s in (0.4, 89, 91, 5339, 5401, 2 * 3600 + 5 * 60)] == ["0 s", "89 s", "2 min", "89 min", "1 h 30 min", "2 h 05 min"]
