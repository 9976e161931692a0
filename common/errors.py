"""The product's small exception family. Messages name the file and what was wrong.

process.py turns each into one line on stderr and the exit code documented here (and in docs/architecture.md):

    0 every case done          3 bad input (InputError)        6 runtime unavailable
    1 unexpected failure       4 bad model package             7 a case exceeded the memory or time budget
    2 usage (argparse)         5 output not writable / disk full    143 stopped by SIGTERM

With several cases the run goes on after a failed case and exits with the first failure's code.
"""

from __future__ import annotations


class TrunkSegError(Exception):
    """Base class: an expected failure that the user can act on."""

    exit_code = 1


class InputError(TrunkSegError):
    """The input CT (or the input folder) cannot be used: missing, unreadable, not CT, not 3D."""

    exit_code = 3


class ModelPackageError(TrunkSegError):
    """The model package is missing, inconsistent or fails its checksums."""

    exit_code = 4


class OutputError(TrunkSegError):
    """The output cannot be written (not writable, disk full, already exists)."""

    exit_code = 5


class RuntimeUnavailableError(TrunkSegError):
    """A requested inference runtime (onnxruntime, torch, TensorRT) cannot run here."""

    exit_code = 6


class LimitError(TrunkSegError):
    """A case does not fit the run's budget: refused up front (memory) or stopped (time)."""

    exit_code = 7


class MemoryBudgetError(LimitError):
    """The volume's header says it needs more memory than the budget allows; nothing was decoded."""


class TimeBudgetError(LimitError):
    """The case ran past its time budget and was stopped; it wrote nothing."""


class TerminatedError(TrunkSegError):
    """The run was asked to stop (SIGTERM, as a platform does at its time limit): the case in progress is discarded."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process that SIGTERM ended


class UsageError(TrunkSegError):
    """The run was asked for something inconsistent (a shard outside its count, shards that do not belong together)."""

    exit_code = 2
