"""Crash matrix: a trial SIGKILLed at each dangerous point in turn still finishes exactly as if nothing happened."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from timing import hang_s

from harness.run.runio import read_jsonl
from harness.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
STUDY = """\
description: two copies of one trial (keep_checkpoints changes nothing it computes), checkpoints every
  3 steps (8 steps per epoch, 2 epochs); one is killed at each dangerous point in turn, the other is the reference
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=256, data.test_subset=128, optim.batch_size=32, optim.epochs=2,
            moco.queue_size=256, moco.bn_splits=4, eval.pixel_floor=false, runtime.log_every=1,
            runtime.checkpoint_every_steps=3, runtime.threads=1]
factors: {runtime.keep_checkpoints: [3, 4]}
seeds: [0]
retries: 4
"""
TIMING = {"epoch_seconds", "images_per_s", "seconds", "diagnostics_seconds", "time"}
# The killed copy's attempts, each SIGKILLed at the next point (a fault fires once per run directory):
# where -> (the fault, the step of the checkpoint the next attempt resumes from; None: it starts afresh).
POINTS = {
    "before the first checkpoint": ("after-step-2", None),
    "between checkpoint write and rename": ("checkpoint-before-rename@6", 3),  # step 6's never replaced step 3's
    "mid-epoch": ("after-step-11", 9),
    "during the final probe": ("probe", 16),  # training ended: only the probe is left
}
REFERENCE, KILLED = 3, 4


def run_dir(results: Path, keep: int) -> Path:
    return results / "crash" / "runs" / f"keep_checkpoints={keep},seed=0"


def outcome(results: Path, keep: int) -> dict:
    run = run_dir(results, keep)
    metrics = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")]
    probes = sorted(p.name for p in run.glob("probe*.json"))
    probe = json.loads((run / "probe.json").read_text())
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{results / 'crash' / 'study.db'}")
    trials = [t for t in study.get_trials() if t.params["runtime.keep_checkpoints"] == keep]
    return {"state": ckpt.load_latest(run / "checkpoints"), "metrics": metrics, "probes": probes,
            "probe": {k: v for k, v in probe.items() if k not in TIMING}, "trials": trials}


# One xdist worker runs the whole matrix, and its study runs once per session: a module-scoped
# fixture is set up again whenever the worker's tests of other modules come in between.
pytestmark = pytest.mark.xdist_group("crash")


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> Path:
    """One study, its two trials at once: the reference copy, and the killed one (retried after each kill)."""
    root = tmp_path_factory.mktemp("crash")
    study = root / "crash.yaml"
    study.write_text(STUDY)
    faults = "+".join(f"{fault}/keep_checkpoints={KILLED},seed=0" for fault, _ in POINTS.values())
    env = {**os.environ, "HARNESS_RESULTS": str(root / "results"), "HARNESS_FAULT": faults}
    cmd = [sys.executable, "-m", "harness.study", str(study), "--executor", "local", "--poll", "0.5",
           "--no-report", "--parallel", "2", "--no-share"]  # the copies have one identity: never shared here
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=hang_s(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "results"


@pytest.mark.slow
def test_a_trial_killed_at_each_dangerous_point_in_turn_finishes_identically(matrix):
    """Each kill is its own attempt's end, and the next attempt starts from the checkpoint the kill left:
    none before the first, the previous one when the rename was cut, the last one mid-epoch, the end
    of training when the final probe was cut. What the trial finally holds is the reference's."""
    reference = outcome(matrix, REFERENCE)
    assert [t.state for t in reference["trials"]] == [optuna.trial.TrialState.COMPLETE]  # never killed
    got = outcome(matrix, KILLED)
    states = [t.state for t in got["trials"]]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1
    assert states.count(optuna.trial.TrialState.FAIL) == len(POINTS)  # each killed attempt, retried
    for killed in [t for t in got["trials"] if t.state == optuna.trial.TrialState.FAIL]:
        assert "ended without a result or an error: killed" in killed.user_attrs["failure_reason"]
    run = run_dir(matrix, KILLED)
    assert sorted(p.name for p in run.glob(".fault-*")) == sorted(f".fault-{f}" for f, _ in POINTS.values())
    logs = "".join(p.read_text() for p in (matrix / "crash" / "jobs").glob("*_log.out"))
    resumed = re.findall(rf"resumed from \S*keep_checkpoints={KILLED},seed=0\S* \(epoch \d+, step (\d+)\)", logs)
    assert sorted(map(int, resumed)) == [step for _, step in POINTS.values() if step is not None]
    attempts = read_jsonl(run / "attempts.jsonl")
    assert len(attempts) == len(POINTS) + 1 and {a["runtime"]["threads"] for a in attempts} == {1}  # the study's
    steps = [r["step"] for r in got["metrics"] if r["kind"] == "step"]
    epochs = [r["epoch"] for r in got["metrics"] if r["kind"] == "epoch"]
    assert epochs == [1, 2] and steps == sorted(set(steps)) and len(steps) == 16  # nothing duplicated
    assert got["probes"] == ["probe.json"]
    assert got["metrics"] == reference["metrics"]
    assert got["probe"] == reference["probe"]
    a, b = got["state"]["model"], reference["state"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
