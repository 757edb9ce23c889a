"""What a study will cost, from what the same work cost before on this kind of machine.

A dry run's only other figure is the time-limit bound, which says nothing about the real cost. Here
every finished run under the results directory that did the same work (same recipe, and the same
values of the settings that decide a run's cost: epochs, batch, training images, image size,
architecture, probe) on the same machine description with the same threads per trial counts as a
measurement: its wall time from its only attempt's start to its final status (start-up, training,
kNN monitor and probe included; resumed runs are left out, their span includes the wait).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from . import runio
from .config import RunConfig, get_dotted

COST_FIELDS = ("optim.epochs", "optim.batch_size", "data.train_subset", "data.image_size", "model.arch",
               "model.tiny_widths", "model.tiny_stem_stride", "eval.probe", "eval.knn_every")


def cost_key(config: dict) -> tuple:
    return (config.get("recipe"),) + tuple(json.dumps(get_dotted(config, f)) for f in COST_FIELDS)


def measured_seconds(results: Path, cfg: RunConfig, machine: str, threads: int) -> list[float]:
    """Wall seconds of every earlier single-attempt completed run with the same cost key, machine
    and threads per trial."""
    want, seconds = cost_key(cfg.to_dict()), []
    for attempts_file in results.rglob("attempts.jsonl"):
        run = attempts_file.parent
        attempts = runio.read_jsonl(attempts_file)
        status = runio.read_status(run)
        if len(attempts) != 1 or status.get("status") != "completed" or "updated" not in status:
            continue
        first = attempts[0]
        if first.get("machine") != machine or (first.get("runtime") or {}).get("threads") != threads:
            continue
        try:
            config = yaml.safe_load((run / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if cost_key(config) == want:
            seconds.append(status["updated"] - first["start"])
    return seconds


def estimate_line(results: Path, cfg: RunConfig, machine: str, threads: int, trials: int, parallel: int,
                  gpus_per_trial: int) -> str:
    if trials == 0:
        return "estimate: nothing to train"
    runs = measured_seconds(results, cfg, machine, threads)
    if not runs:
        return (f"estimate: no earlier run of this work on this machine ({machine}, {threads} thread(s) a "
                f"trial) under {results}; only the time-limit bound above")
    per_trial = statistics.median(runs)
    wall = math.ceil(trials / max(parallel, 1)) * per_trial
    gpu_hours = f", {trials * gpus_per_trial * per_trial / 3600:.1f} GPU-hours" if gpus_per_trial else ""
    return (f"estimate: {per_trial / 60:.1f} min a trial (median of {len(runs)} earlier runs of this work here), "
            f"{trials} trials {min(parallel, trials)} at a time: about {wall / 60:.0f} min of wall time{gpu_hours}")
