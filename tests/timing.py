"""How the tests wait: for a condition, never for a figure of this machine's speed.

Machines of one kind differ 2x and more, and a suite may share them with other work. So a test
waits for what it needs (the process ended, the file appeared, the state changed) and gives up only
at a ceiling that catches hangs, never slowness: `HANG_S`. Where a test must set a time against the
machine's work itself (a process group's timeout that a slow rank must not trip), it scales the time
by `speed()`: how much slower than the reference machine a fixed computation ran here (measured once
per test run, by the first worker that asks; the others read it from the file the run shares).

`HARNESS_TEST_SPEED` set by hand overrides the measurement (e.g. 3 on a machine shared with a build)."""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

# The reference computation's CPU-seconds on the machine docs/testing.md measured (AMD EPYC, 2 cores,
# idle); `speed()` is this machine's time over it, never below 1 (a faster machine keeps the defaults).
REFERENCE_S = 0.25
SPEED_ENV = "HARNESS_TEST_SPEED"
# The file one test run's workers share the measurement through (set by tests/conftest.py in the
# process that starts them): the first to ask measures, under a lock, and the others read it.
SPEED_FILE_ENV = "HARNESS_TEST_SPEED_FILE"

# A test command or wait that has not finished after this long (times the speed) has hung: an
# end-to-end study here takes a few minutes on the reference machine, the longest under 10.
BASE_CEILING_S = 1200.0


def _reference_work() -> float:
    """Wall seconds of a fixed mix of what the tests' jobs do (small conv forward and backward on
    the threads torch would use, and interpreter work), best of three so start-up noise is not counted."""
    import torch

    x = torch.randn(64, 8, 28, 28, generator=torch.Generator().manual_seed(0))
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(30):
            conv(x).square().mean().backward()
        total = 0
        for i in range(750_000):
            total += i % 7
        best = min(best, time.perf_counter() - start)
    return best


def _measured() -> str:
    return f"{max(1.0, _reference_work() / REFERENCE_S):.2f}"


def measure_speed() -> float:
    """This machine's slowness against the reference (>= 1): set by hand, or measured once per test
    run, not in the process that starts the workers (it would import torch for it alone: ~3 CPU-s)."""
    if SPEED_ENV not in os.environ:
        shared = os.environ.get(SPEED_FILE_ENV)
        if not shared:
            os.environ[SPEED_ENV] = _measured()
        else:
            with open(shared, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
                fh.seek(0)
                text = fh.read().strip()
                if not text:
                    text = _measured()
                    fh.write(text)
                os.environ[SPEED_ENV] = text
    return float(os.environ[SPEED_ENV])


def shared_speed() -> str | None:
    """The run's measurement, if a worker has made it (for the summary the starting process prints)."""
    if SPEED_ENV in os.environ:
        return os.environ[SPEED_ENV]
    shared = os.environ.get(SPEED_FILE_ENV)
    text = open(shared).read().strip() if shared and os.path.exists(shared) else ""
    return text or None


def speed() -> float:
    return measure_speed()


def scaled(seconds: float) -> float:
    """A time set against this machine's work (e.g. a process group's timeout), at this machine's speed."""
    return seconds * speed()


def hang_s() -> float:
    """The ceiling of any wait in the tests: past it, the thing waited for has hung."""
    return scaled(BASE_CEILING_S)


def wait_until(predicate: Callable[[], object], what: str, poll: float = 0.3, ceiling: float | None = None) -> None:
    """Return once `predicate()` is true; fail naming `what` if it is still false at the hang ceiling."""
    deadline = time.monotonic() + (hang_s() if ceiling is None else ceiling)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (the hang ceiling: it never happened)")
        time.sleep(poll)
