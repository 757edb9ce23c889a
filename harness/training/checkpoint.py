"""Checkpoints: written atomically (temporary file, fsync, rename), loaded newest-good-first.

A checkpoint holds the model (queue and pointer included), optimizer, grad scaler, position
(epoch, step within epoch, global step), the running epoch sums, RNG states and the resolved config.
Loading uses `torch.load(weights_only=True)`: no code runs from a checkpoint file. Checkpoints
always load to the CPU, whatever device the run trains on: `load_state_dict` of the model and the
optimizer moves tensors to their parameters' device, and the RNG states must stay CPU ByteTensors
(`torch.set_rng_state` refuses a CUDA one; a CUDA tensor has no `.numpy()`).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.run import faults, runio
from harness.run.errors import HarnessError

FORMAT = "moco-harness/checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(HarnessError, RuntimeError):
    """A checkpoint that cannot be read (truncated, another run's, another format)."""


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` saved. Tolerates tensors on another device (a checkpoint loaded
    with some other map_location) and another number of visible GPUs than the saving process had:
    the generators both have are restored, the rest keep their seeds (every training step reseeds
    from (seed, step) anyway, see harness.training.step.step_seed)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def save(directory: Path, state: dict[str, Any], keep: int = 2) -> Path:
    final = directory / f"ckpt-{state['global_step']:09d}.pt"
    write(final, state, before_rename=lambda: faults.kill_point("checkpoint-before-rename", directory.parent,
                                                                step=state["global_step"]))
    for old in checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def keep_epoch(directory: Path, saved: Path, epoch: int) -> Path:
    """A second name for the checkpoint just saved, outside the newest-k pruning and the resume's
    listing: checkpoints/epochs/epoch-<E>.pt (a hard link where the filesystem has them)."""
    kept = runio.kept_checkpoint(directory, epoch)
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.parent / f".{kept.name}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(saved, tmp)
    except OSError:
        shutil.copyfile(saved, tmp)
    os.replace(tmp, kept)
    return kept


def write(path: Path, state: dict[str, Any], before_rename=None) -> None:
    """`state` with the format tag, written atomically: a temporary file, fsync, renamed over `path`
    (a reader sees the old file or the new one, never a part)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)


def load_file(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "not usable"
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a moco-harness checkpoint (no format tag {FORMAT!r})")
    return state


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; unusable newer ones are skipped with a warning."""
    for path in checkpoints(directory):
        try:
            state = load_file(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping {exc}; falling back to the previous checkpoint", stacklevel=2)
            continue
        state["path"] = str(path)
        return state
    return None
