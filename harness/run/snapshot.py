"""Jobs run the code of the moment they were submitted, not of the moment they start.

A queued SLURM job may start hours after submission and be requeued days later; editing `harness/`
or a recipe in the meantime would silently change what it runs (submitit's known pitfall). The
driver copies `harness/` and `studies/` once per content version to `<study>/code/<digest>/` and
submits from that directory with it first on PYTHONPATH: sbatch records both (a requeued job keeps
them), a local job inherits both, so every attempt of a job imports the snapshot.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout: harness/ and studies/
PARTS = ("harness", "studies")
SUFFIXES = (".py", ".yaml", ".yml")
SUBMIT_DIR = "HARNESS_SUBMIT_DIR"


def _files(root: Path) -> list[Path]:
    return sorted(p for part in PARTS if (root / part).is_dir() for p in (root / part).rglob("*")
                  if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts)


def digest(root: Path = CODE_ROOT) -> str:
    h = hashlib.sha1()
    for path in _files(root):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def take(dest: Path, root: Path = CODE_ROOT) -> Path:
    """`dest/<digest>/` holding a copy of the code; made once, atomically (a rename)."""
    target = dest / digest(root)
    if target.is_dir():
        return target
    tmp = dest / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for path in _files(root):
        copy = tmp / path.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
    try:
        tmp.rename(target)
    except OSError:  # another driver made the same snapshot first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def jobs_use(code_dir: Path):
    """Jobs submitted inside this block import `harness` from `code_dir`.

    A job's interpreter puts its starting directory first on sys.path, ahead of PYTHONPATH, so the
    driver also submits from inside `code_dir` (a local job inherits the directory, sbatch records it);
    `restore_cwd` then moves the job back to where the driver was started, for relative paths.
    """
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", SUBMIT_DIR)}
    cwd = os.getcwd()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(code_dir)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    os.environ[SUBMIT_DIR] = cwd
    os.chdir(code_dir)
    try:
        yield
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def restore_cwd() -> None:
    """In a job: back to the directory its driver was started from (relative data roots etc.)."""
    where = os.environ.get(SUBMIT_DIR)
    if where and Path(where).is_dir():
        os.chdir(where)


def code_origin() -> str:
    """The directory `harness` was imported from (recorded with each attempt of a trial)."""
    return str(CODE_ROOT)
