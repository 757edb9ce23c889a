"""Test-only fault injection, chosen by the HARNESS_FAULT environment variable.

HARNESS_FAULT=<point> SIGKILLs the process when it reaches <point> ("after-step-N",
"checkpoint-before-rename", "probe"); <point>@N fires only at global step N (e.g. the second
checkpoint's rename, when a previous one exists); HARNESS_FAULT=raise-once raises at the start of a
trial, raise-always at the start of every attempt. HARNESS_FAULT=pace@S sleeps S seconds after
every epoch of a run's first attempt: a job that outlives its time limit without spending CPU (the
time-limit test), and, once resumed from a checkpoint, finishes without more waiting; pace@S/<run>
paces one trial only. HARNESS_FAULT=stall-<point>@S sleeps S seconds at <point> ("probe": rank 0's
final probe, made long), nan-loss@N makes the loss NaN at global step N (set in one DDP rank's
environment: the rank that diverges alone). HARNESS_FAULT=hold@DIR holds every run after epoch E
for as long as the file DIR/hold-E exists (the standard probe after its epoch E: DIR/hold-probe-E): a
test decides when training goes on, instead of guessing how long it takes.
Each fires once per run directory (a marker file records it), so the retry that follows succeeds.
<point>/<run directory name> limits a fault to that trial (one trial of a packed job, or of a study
whose trials each get their own); several faults at once are joined by '+'
(HARNESS_FAULT=after-step-64/momentum=0.9,seed=0+pace@1).
Unset, every call is a no-op.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def _faults() -> list[str]:
    return [f for f in os.environ.get("HARNESS_FAULT", "").split("+") if f]


def _first_time(point: str, run_dir: Path | None, step: int | None = None) -> bool:
    for wanted in _faults():
        fault, _, only = wanted.partition("/")
        name, _, at = fault.partition("@")
        if name != point or (at and str(step) != at):
            continue
        if run_dir is None:
            return True
        if only and Path(run_dir).name != only:
            continue
        marker = Path(run_dir) / f".fault-{fault}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True
    return False


def kill_point(point: str, run_dir: Path | None = None, step: int | None = None) -> None:
    if _first_time(point, run_dir, step):
        os.kill(os.getpid(), 9)


def pace(run_dir: Path | None = None, resumed: bool = False) -> None:
    if resumed:  # only the attempt that started the run is slowed: a resumed one finishes at full speed
        return
    for wanted in _faults():
        fault, _, only = wanted.partition("/")
        name, _, seconds = fault.partition("@")
        if name == "pace" and not (only and run_dir is not None and Path(run_dir).name != only):
            time.sleep(float(seconds))


def hold(epoch: int, stage: str = "") -> None:
    """HARNESS_FAULT=hold@DIR: wait here while DIR/hold-<stage><epoch> exists."""
    for wanted in _faults():
        name, _, directory = wanted.partition("@")
        if name == "hold":
            while (Path(directory) / f"hold-{stage}{epoch}").exists():
                time.sleep(0.2)


_RAISED: set[str] = set()


def raise_once(point: str) -> None:
    """HARNESS_FAULT=<point>: raise a RuntimeError the first time this process reaches <point>."""
    if point in _faults() and point not in _RAISED:
        _RAISED.add(point)
        raise RuntimeError(f"injected fault (HARNESS_FAULT={point})")


def raise_point(point: str, run_dir: Path | None = None) -> None:
    if "raise-always" in _faults():  # every attempt: retries run out
        raise RuntimeError("injected fault (HARNESS_FAULT=raise-always)")
    if _first_time(point, run_dir):
        raise RuntimeError(f"injected fault (HARNESS_FAULT={point})")


def stall(point: str) -> None:
    for wanted in _faults():
        name, _, seconds = wanted.partition("@")
        if name == f"stall-{point}":
            time.sleep(float(seconds))


def nan_at(step: int) -> bool:
    return _first_time("nan-loss", None, step)
