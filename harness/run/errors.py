"""The harness's errors: input it refuses, said in one line that names the field and the fix.

Every face (`python -m harness.*`) catches `HarnessError` alone, prints `error: <message>` and exits 2;
anything else is a bug and keeps its traceback. The subclasses say which layer refused, and keep
`ValueError`/`RuntimeError` as their second base so older callers' `except` clauses still hold.
"""
from __future__ import annotations


class HarnessError(Exception):
    """Input the harness refuses before (or instead of) computing: the message names the field and the fix."""


class ConfigError(HarnessError, ValueError):
    """A run configuration that cannot run (recipe, `--set`, a study's level)."""


class StudyError(HarnessError, ValueError):
    """A study (or suite, cluster file, storage) that cannot run; raised before anything is submitted."""


def require_at_least(name: str, value: float, low: float, meaning: str) -> None:
    """A command-line number's lower bound, as one line: `--parallel: must be >= 1 (trials at once), got 0.`"""
    if not value >= low:  # also refuses NaN
        raise HarnessError(f"{name}: must be >= {low:g} ({meaning}), got {value:g}.")
