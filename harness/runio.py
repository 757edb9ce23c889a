"""Small, safe file operations on a run directory (atomic writes, JSON lines)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from .config import ConfigError


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


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


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def truncate_metrics(path: Path, global_step: int) -> None:
    """On resume, drop records written after the checkpoint being resumed (they will be redone),
    so metrics.jsonl never holds a step or an epoch twice."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= global_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_status(run_dir: Path, status: str, **fields) -> None:
    write_json(run_dir / "status.json", {"status": status, "updated": time.time(), **fields})


def read_status(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_writable(run_dir: Path) -> None:
    probe = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--out {run_dir}: {probe} is not writable; choose another output directory.")
