"""How the tests wait: for a condition, never for a figure of this machine's speed.

Machines of one kind differ 2x and more, and a suite may share them with other work. So a test
waits for what it needs (the process ended, the file appeared, the state changed) and gives up only
at a ceiling that catches hangs, never slowness: `HANG_S`. Where a test must set a time against the
machine's work itself (a process group's timeout that a slow rank must not trip), it scales the time
by `speed()`: how much slower than the reference machine a fixed computation ran here when the test
run started (measured once, in the pytest process that starts the workers, which inherit it).

`HARNESS_TEST_SPEED` set by hand overrides the measurement (e.g. 3 on a machine shared with a build)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

# The reference computation's CPU-seconds on the machine docs/testing.md measured (AMD EPYC, 2 cores,
# idle); `speed()` is this machine's time over it, never below 1 (a faster machine keeps the defaults).
REFERENCE_S = 0.25
SPEED_ENV = "HARNESS_TEST_SPEED"

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


def measure_speed() -> float:
    """This machine's slowness against the reference (>= 1), set in the environment for the workers."""
    if SPEED_ENV not in os.environ:
        os.environ[SPEED_ENV] = f"{max(1.0, _reference_work() / REFERENCE_S):.2f}"
    return float(os.environ[SPEED_ENV])


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
