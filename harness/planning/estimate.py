"""What a study will cost, from what the same work cost before on this kind of machine.

A dry run's only other figure is the time-limit bound, which says nothing about the real cost. Here
every finished run under the results directory that did the same work (same recipe, and the same
values of the settings that decide a run's cost: epochs, batch, training images, image size,
architecture, probe) on the same machine description with the same threads per trial counts as a
measurement: its wall time from its only attempt's start to its final status (start-up, training,
kNN monitor and probe included; resumed runs are left out, their span includes the wait). Where no
such run exists, a few training steps of the study's first point are timed here on synthetic images
of the recipe's shape (cached per work, machine and threads): training alone, a lower bound.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from harness.run import runio
from harness.run.config import RunConfig, get_dotted

COST_FIELDS = ("optim.epochs", "optim.batch_size", "data.train_subset", "data.image_size", "model.arch",
               "model.tiny_widths", "model.tiny_stem_stride", "eval.probe", "eval.knn_every", "eval.knn_train_subset",
               "eval.knn_test_subset")


# What one training step's time depends on (not the epochs, the seed or the evaluation).
STEP_FIELDS = ("recipe", "optim.batch_size", "data.image_size", "data.augmentation", "data.loader", "model.arch",
               "model.tiny_widths", "model.tiny_stem_stride", "moco.key_encoder", "moco.queue_size", "moco.dim",
               "moco.mlp", "moco.shuffle_bn", "moco.bn_splits", "moco.symmetric", "runtime.precision",
               "runtime.device", "runtime.compile", "runtime.channels_last")


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
            config = runio.read_config(run)
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
    if not runs and cfg.runtime.device == "cuda" and "no GPU" in machine:
        return (f"estimate: this work trains on CUDA and this machine ({machine}) has no GPU to time a step on; "
                f"{trials} trials x {steps_per_epoch(cfg) * cfg.optim.epochs} steps each")
    if not runs:
        step = timed_step_seconds(cfg, machine, threads)
        steps = cfg.optim.epochs * steps_per_epoch(cfg)
        wall = math.ceil(trials / max(parallel, 1)) * step * steps
        gpu_hours = f", {trials * gpus_per_trial * step * steps / 3600:.1f} GPU-hours or more" if gpus_per_trial else ""
        return (f"estimate: no earlier run of this work on this machine ({machine}, {threads} thread(s) a trial); "
                f"timed here: {step:.3f} s a training step x {steps} steps = {step * steps / 60:.1f} min a trial of "
                f"training alone (start-up, kNN monitor and probe not included), {trials} trials "
                f"{min(parallel, trials)} at a time: at least {wall / 60:.0f} min of wall time{gpu_hours}")
    per_trial = statistics.median(runs)
    wall = math.ceil(trials / max(parallel, 1)) * per_trial
    gpu_hours = f", {trials * gpus_per_trial * per_trial / 3600:.1f} GPU-hours" if gpus_per_trial else ""
    return (f"estimate: {per_trial / 60:.1f} min a trial (median of {len(runs)} earlier runs of this work here), "
            f"{trials} trials {min(parallel, trials)} at a time: about {wall / 60:.0f} min of wall time{gpu_hours}")


def steps_per_epoch(cfg: RunConfig) -> int:
    """Training steps an epoch (drop_last, as training): in-memory datasets by their known size, image
    folders by counting their training images."""
    from harness.run.datafiles import folder_image_count, pretrain_size

    images = pretrain_size(cfg)
    if images is None and cfg.data.dataset == "imagefolder":
        images = folder_image_count(cfg.data.root)
        images = min(images, cfg.data.train_subset) if cfg.data.train_subset else images
    return max(1, (images or cfg.optim.batch_size) // cfg.optim.batch_size)


def timed_step_seconds(cfg: RunConfig, machine: str, threads: int, steps: int = 6, warmup: int = 2) -> float:
    """Median seconds of one training step (augmentation included) with `threads` CPU threads, on
    synthetic images of the recipe's shape; cached in the harness cache per work, machine and threads."""
    cache = runio.cache_dir() / "step_seconds.json"
    key = json.dumps([*(get_dotted(cfg.to_dict(), f) for f in STEP_FIELDS), machine, threads])
    known = runio.read_json(cache) if cache.exists() else {}
    if key in known:
        return known[key]
    from harness.training.step import median_step_seconds  # the measurement trains: torch comes with it

    seconds = median_step_seconds(cfg, threads, steps, warmup)
    runio.write_json(cache, {**known, key: seconds})
    return seconds
