"""The product's small exception family. Messages name the file and what was wrong.

process.py turns each into one line on stderr and the exit code documented here.
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
