"""How far a run is: one `[k/N] case ... s, about T left` line on stderr per case, and a tqdm bar on a terminal.

The lines are written in every layout (a container log, a Slurm .out file, a terminal); the estimate is
the mean time of the cases done in this process times the cases left (skipped ones cost nothing and do
not count towards the mean).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """Rounded for a person: '40 s', '12 min', '3 h 05 min'."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def terminal_bar(total: int, *, label: str, unit: str, leave: bool, terminal: bool | None = None):
    """A tqdm bar when stderr is a terminal (`terminal`: None to look, True/False to say) and tqdm is installed, else None:
    container logs get lines, not bars."""
    if not total or not (terminal if terminal is not None else sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=leave)


class Progress:
    """Counts the cases of a run as they end; `line` is what `log` receives for each."""

    def __init__(self, total: int, *, log: Callable[[str], None], terminal: bool | None = None):
        self.total = total
        self.log = log
        self.finished = 0
        self._worked_s = 0.0
        self._worked = 0
        self._bar = terminal_bar(total, label="cases", unit="case", leave=True, terminal=terminal)

    def remaining_s(self) -> float | None:
        if not self._worked:
            return None
        return self._worked_s / self._worked * (self.total - self.finished)

    def case_ended(self, case_id: str, *, seconds: float, outcome: str = "done") -> str:
        """Count one case (`outcome`: done, failed, skipped) and log its line; the line is returned."""
        self.finished += 1
        if outcome != "skipped":
            self._worked_s += seconds
            self._worked += 1
        left = self.total - self.finished
        if left == 0:
            tail = "none left"
        else:
            remaining = self.remaining_s()
            tail = f"about {format_duration(remaining)} left" if remaining is not None else f"{left} left, no estimate yet"
        what = "skipped (already complete)" if outcome == "skipped" else f"{outcome} in {seconds:.1f} s"
        line = f"[{self.finished}/{self.total}] case {case_id} {what}, {tail}"
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(tail, refresh=True)
        self.log(line)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
