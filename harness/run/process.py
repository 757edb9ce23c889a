"""A harness process's imports, kept out of the cyclic garbage collector's way.

A process that trains imports torch and `torch._dynamo` (some 2,400 modules: classes, functions,
caches) and keeps all of it until it exits. Two costs follow, both paid for nothing:

- While they are imported, the collector runs hundreds of collections over a heap that only grows
  (every object it finds is alive). `with start_up():` pauses it for the imports a command or a
  job makes before its work, then freezes them.
- Afterwards, every full collection, and one more at exit, scans all of it. `freeze_imports()` moves
  what is alive into a generation that collections never scan, and resumes a paused collector.

What a run computes is untouched: frozen objects are still freed when their last reference goes;
only reference cycles among them wait for the exit (measured: docs/performance.md#a-process-starts-and-ends).
"""
from __future__ import annotations

import atexit
import gc
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.context import ForkServerContext

_frozen = False
_paused = False


@contextmanager
def start_up() -> Iterator[None]:
    """`with start_up():` around the imports a process runs on: the collector paused while they load,
    what they left frozen after (freeze_imports), the collector resumed. In a process that has frozen
    its imports already (a worker's next trial, a face called in a running process, e.g. a test's),
    only the imports run."""
    pause_collection()
    try:
        yield
    finally:
        freeze_imports()


def pause_collection() -> None:
    """Pause the collector until `freeze_imports()` (where the two cannot share a `with`: a pytest
    worker pauses as it configures, freezes when collection ends). A no-op once the process has
    frozen its imports, and where the collector was already off."""
    global _paused
    if _frozen or _paused or not gc.isenabled():
        return
    gc.disable()
    _paused = True


def freeze_imports() -> None:
    """Freeze what is alive now (call it once the process has imported what it runs) and again at
    exit, before the interpreter's last collection; resume the collector `pause_collection()` paused. Once per
    process: a process that runs several trials in turn (a worker, an evaluation pack) must not freeze
    one trial's garbage for the next."""
    global _frozen, _paused
    if _frozen:
        return
    _frozen = True
    gc.freeze()
    atexit.register(gc.freeze)
    if _paused:
        _paused = False
        gc.enable()


TORCH = ("torch", "torch.distributed")  # what every torch process of the harness imports first


def torch_forkserver(*modules: str) -> ForkServerContext:
    """The context a process's own torch processes start in (a packed job's trials, the device
    check's ranks): they fork from a server that imported torch and `modules` once, an interpreter
    that never ran an op nor touched CUDA, so each skips torch's start-up (docs/performance.md) and
    still starts its own threads and device context. Not forked from the caller, whose CUDA context
    and thread pools a child must not inherit. Module names, not modules: the caller imports no torch.
    One server a process: the preload of the first call that starts a process is the one it has."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*TORCH, *modules])
    return context
