"""The evaluation's exceptions: the product's family (common/errors.py) plus two of its own.

Exit codes: 2 configuration (bad option, labels/levels/mapping file), 3 bad input (InputError: an
unreadable or inconsistent prediction or ground truth, a missing prediction), 5 output not writable.
"""

from __future__ import annotations

from common.errors import InputError, OutputError, TrunkSegError

__all__ = ["CaseError", "ConfigError", "InputError", "OutputError", "TrunkSegError"]


class ConfigError(TrunkSegError):
    """An option, labels file, levels file or mapping file cannot be used."""

    exit_code = 2


class CaseError(InputError):
    """One case cannot be scored; carries the case id so the summary names it."""

    def __init__(self, case_id: str, message: str):
        super().__init__(f"{case_id}: {message}")
        self.case_id = case_id
        self.reason = message

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.case_id, self.reason))
