"""Runs shared across studies. A run is what it computes (its identity: the config without the
runtime-only fields, seed included), so a study that asks for a configuration any study under the
results directory has already finished reuses that run instead of training it again.

Storage stays per study: the sharing study records its own trial, marked `shared_from`, and its
runs/<key> is a relative symbolic link to the run directory that holds the result, so reports,
--status and rebuilt reports read it like any other run.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from harness.run import runio
from harness.run.config import config_from_dict
from harness.run.errors import ConfigError
from harness.run.outcome import Outcome

SKIP = {"code", "jobs", "report"}  # study subfolders that never hold run directories
# Committed examples (results/examples/) are there to read and rebuild, not to stand in for a user's
# own runs: the main command on a fresh clone trains. HARNESS_RESULTS=results/examples builds on them.
EXAMPLES = "examples"
REUSABLE = (Outcome.COMPLETED.value, Outcome.DIVERGED.value)  # results; pruned and failed runs are not


class RunIndex:
    """Finished run directories under a results root, by identity digest. The digest is recomputed
    from each run's config.yaml with the current config code (its defaults filled in), so runs made
    before a config field was added are still found."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._digests: dict[Path, tuple[float, str | None]] = {}  # run dir -> (status mtime, digest)

    def find(self, digest: str, besides: Path | None = None, runs: dict[str, list[Path]] | None = None) -> Path | None:
        """A finished run with this identity, other than `besides`: of several (one computation run
        twice), one whose metrics carry the dictionary diagnostics (they never change what a run
        computes, and a report can show them), then the first by path. `runs`: a `by_digest()` taken
        once for many lookups (one walk of the results tree, not one each)."""
        runs = self.by_digest() if runs is None else runs
        candidates = [r for r in runs.get(digest, []) if r != besides]
        return min(candidates, key=lambda r: (not _has_diagnostics(r), str(r)), default=None)

    def by_digest(self) -> dict[str, list[Path]]:
        """Every finished run under the root, by identity digest, in path order."""
        out: dict[str, list[Path]] = {}
        for run_dir in self._finished():
            digest = self._digest(run_dir)
            if digest is not None:
                out.setdefault(digest, []).append(run_dir)
        return out

    def _finished(self) -> list[Path]:
        found = []
        for here, dirs, _ in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP and not (d == EXAMPLES and Path(here) == self.root))
            if Path(here).name != "runs":
                continue
            for name in list(dirs):
                run_dir = Path(here) / name
                if not run_dir.is_symlink() and runio.read_status(run_dir).get("status") in REUSABLE:
                    found.append(run_dir)
            dirs[:] = []  # nothing below a run directory is another run (checkpoints, probe)
        return found

    def _digest(self, run_dir: Path) -> str | None:
        mtime = (run_dir / "status.json").stat().st_mtime
        cached = self._digests.get(run_dir)
        if cached is None or cached[0] != mtime:
            try:
                digest = config_from_dict(runio.read_config(run_dir)).digest()
            except (OSError, ConfigError, yaml.YAMLError):  # a config the current code cannot read: not shared
                digest = None
            self._digests[run_dir] = cached = (mtime, digest)
        return cached[1]


def _has_diagnostics(run_dir: Path) -> bool:
    """Whether a run measured its dictionary (runs made before the diagnostics existed did not)."""
    try:
        return '"key_consistency"' in (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return False


def link(run_dir: Path, source: Path) -> None:
    """runs/<key> -> the shared run, relative: the results tree can move (a committed example)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.symlink_to(os.path.relpath(source, run_dir.parent), target_is_directory=True)
