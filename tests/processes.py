"""Waiting for a daemon to exit, where no one reaps it.

In a container whose PID 1 does not reap orphans, a daemon that exited stays a zombie: /proc/PID
exists until the container ends. Counting that as running made every server stop wait out its
whole timeout (30 s for PostgreSQL, 20 s for slurmctld) and doubled the tests' outages."""
from __future__ import annotations

import time
from pathlib import Path


def exited(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie or dead: it has exited


def wait_exited(pid: int, timeout: float) -> bool:
    """True once `pid` has exited; False if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not exited(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
