"""The harness's faces (`python -m harness.NAME ARGS`) run through their `main` in the test's process:
no interpreter start and torch import (~3 s a call). What they print is captured, as a subprocess's
would be. The `harness_cli` and `study_cli` fixtures (tests/conftest.py) and test_train's `run_train`
all run a face here."""
from __future__ import annotations

import contextlib
import importlib
import io
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_main(name: str, argv: list[str]) -> CliResult:
    main = importlib.import_module(f"harness.{name}").main
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
    return CliResult(code, stdout.getvalue(), stderr.getvalue())
