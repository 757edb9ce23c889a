"""Small, safe file operations on a run directory (atomic writes, JSON lines)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from harness.run.errors import ConfigError, HarnessError

# Where studies keep their storage, run directories and reports (results/<study>/).
RESULTS = Path(os.environ.get("HARNESS_RESULTS", "results"))


def cache_dir() -> Path:
    """Measurements worth keeping between runs (raw-pixel floors, timed steps); never results."""
    return Path(os.environ.get("HARNESS_CACHE", "~/.cache/harness")).expanduser()


def write_atomic(path: Path, text: str) -> None:
    write_atomic_bytes(path, text.encode())


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename: a reader sees the old file or the whole new one, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def load_yaml(text: str):
    """YAML as plain data (safe: no code runs), with libyaml's loader where PyYAML has it: ~7x faster
    than the pure-Python one, and a report or a driver reads hundreds of config files and recipes."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_config(run_dir: Path) -> dict:
    """A run's config.yaml as plain data ({} when empty)."""
    return load_yaml((Path(run_dir) / "config.yaml").read_text()) or {}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object per line (metrics.jsonl, attempts.jsonl); a line cut by a crash is skipped on read."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()


def truncate_metrics(path: Path, global_step: int) -> list[dict]:
    """On resume, drop records written after the checkpoint being resumed (they will be redone),
    so metrics.jsonl never holds a step or an epoch twice. Returns the records kept."""
    if not path.exists():
        return []
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= global_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def write_status(run_dir: Path, status: str, **fields) -> None:
    write_json(run_dir / "status.json", {"status": status, "updated": time.time(), **fields})


def read_json(path: Path) -> dict:
    """A JSON file written by write_json (atomic: whole or absent); {} when absent."""
    return json.loads(path.read_text()) if path.exists() else {}


def read_status(run_dir: Path) -> dict:
    return read_json(run_dir / "status.json")


def kept_checkpoint(checkpoints: Path, epoch: int) -> Path:
    """Where the checkpoint of an epoch in runtime.keep_epochs is kept (outside the newest-k pruning)."""
    return Path(checkpoints) / "epochs" / f"epoch-{epoch:05d}.pt"


def check_writable(directory: Path) -> None:
    """Fail early, with the path named, where outputs could not be written (tried, not guessed:
    permission bits say nothing for root or read-only mounts)."""
    directory = Path(directory).absolute()
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise ConfigError(f"{directory}: not writable, {existing} is a file, not a directory; "
                          f"choose another output location.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"{directory}: not writable ({exc.strerror} in {existing}); "
                          f"choose another output location.") from None


class LockUnsupported(OSError):
    """flock is not available on this filesystem (Lustre mounted without -o flock, some NFS setups)."""


def filesystem_of(path: Path) -> str:
    """The mount holding `path`, as /proc/mounts names it: 'TYPE at MOUNTPOINT'."""
    best, where = ("unknown", "?"), str(Path(path).resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, point, kind, *_ = line.split()
            if where == point or where.startswith(point.rstrip("/") + "/"):
                if len(point) >= len(best[1]) or best[1] == "?":
                    best = (kind, point)
    except OSError:
        pass
    return f"{best[0]} at {best[1]}"


def flock(handle, flags: int) -> None:
    """fcntl.flock, or LockUnsupported naming the filesystem: the harness's run-directory and study
    locks need locks that every node sees (NFSv4, Lustre with -o flock, GPFS, local disks)."""
    try:
        fcntl.flock(handle, flags)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            raise LockUnsupported(exc.errno, f"{handle.name}: the filesystem ({filesystem_of(Path(handle.name))}) "
                                  f"does not support file locks ({exc.strerror}); put results/ (HARNESS_RESULTS) on "
                                  f"one that does (NFSv4, Lustre mounted with -o flock, GPFS)") from None
        raise


def lock_run_dir(run_dir: Path, wait: bool = False):
    """Hold an exclusive lock on a run directory while training in it (released when the process
    ends, killed or not): a second process on the same run fails fast instead of interleaving, or,
    with `wait` (trial jobs), waits for the first to end and then goes on from what it left. A job
    waits only when the same trial was started twice: a driver killed after starting a job but
    before recording it cannot know the job exists, and starts the trial again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            handle.close()
            raise RunDirBusy(f"{run_dir}: another process is training in this run directory") from None
        print(f"[train] {run_dir}: another job of this trial is still training here; waiting for it to end, "
              f"then going on from its last checkpoint.", flush=True)
        flock(handle, fcntl.LOCK_EX)
    return handle


class RunDirBusy(HarnessError, RuntimeError):
    """Another process holds the run directory's lock."""

