"""Test-only fault injection, chosen by the HARNESS_FAULT environment variable.

HARNESS_FAULT=<point> SIGKILLs the process when it reaches <point> ("after-step-N",
"checkpoint-before-rename", "probe"); HARNESS_FAULT=raise-once raises at the start of a trial.
Each fires once per run directory (a marker file records it), so the retry that follows succeeds.
Unset, every call is a no-op.
"""
from __future__ import annotations

import os
from pathlib import Path


def _first_time(point: str, run_dir: Path | None) -> bool:
    if os.environ.get("HARNESS_FAULT") != point:
        return False
    if run_dir is None:
        return True
    marker = Path(run_dir) / f".fault-{point}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def kill_point(point: str, run_dir: Path | None = None) -> None:
    if _first_time(point, run_dir):
        os.kill(os.getpid(), 9)


def raise_point(point: str, run_dir: Path | None = None) -> None:
    if _first_time(point, run_dir):
        raise RuntimeError(f"injected fault (HARNESS_FAULT={point})")
