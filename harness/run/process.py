"""A harness process's imports, kept out of the cyclic garbage collector's way.

A process that trains imports torch (some 2,400 modules: classes, functions, caches) and keeps all of
it until it exits. CPython's full collections scan every tracked object each time, and one more runs
at exit over objects the exit frees anyway. `gc.freeze()` moves what is alive into a generation that
collections never scan (what it saves, measured: docs/performance.md#a-process-starts-and-ends).
What a run computes is untouched: frozen objects are still freed when their last reference goes;
only reference cycles among them wait for the exit.
"""
from __future__ import annotations

import atexit
import gc

_frozen = False


def freeze_imports() -> None:
    """Freeze what is alive now (call it once the process has imported what it runs) and again at
    exit, before the interpreter's last collection. Once per process: a process that runs several
    trials in turn (a worker, an evaluation pack) must not freeze one trial's garbage for the next."""
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.freeze()
    atexit.register(gc.freeze)
