"""Crash matrix: a trial SIGKILLed at each dangerous point still finishes exactly as if nothing happened."""
import json
import os
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
description: five copies of one trial (keep_checkpoints changes nothing it computes), checkpoints every
  3 steps (8 steps per epoch, 2 epochs); four are killed at a dangerous point each, one is the reference
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=256, data.test_subset=128, optim.batch_size=32, optim.epochs=2,
            moco.queue_size=256, moco.bn_splits=4, eval.pixel_floor=false, runtime.log_every=1,
            runtime.checkpoint_every_steps=3, runtime.threads=1]
factors: {runtime.keep_checkpoints: [3, 4, 5, 6, 7]}
seeds: [0]
retries: 2
"""
TIMING = {"epoch_seconds", "images_per_s", "seconds", "diagnostics_seconds", "time"}
POINTS = {  # where -> (the fault, the copy it hits)
    "before the first checkpoint": ("after-step-2", 4),
    "mid-epoch": ("after-step-11", 5),
    "between checkpoint write and rename": ("checkpoint-before-rename@6", 6),  # the previous one is at step 3
    "during the final probe": ("probe", 7),
}
REFERENCE = 3


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
    """One study, two trials at a time: the reference copy and the four killed ones (each retried)."""
    root = tmp_path_factory.mktemp("crash")
    study = root / "crash.yaml"
    study.write_text(STUDY)
    faults = "+".join(f"{fault}/keep_checkpoints={keep},seed=0" for fault, keep in POINTS.values())
    env = {**os.environ, "HARNESS_RESULTS": str(root / "results"), "HARNESS_FAULT": faults}
    cmd = [sys.executable, "-m", "harness.study", str(study), "--executor", "local", "--poll", "0.5",
           "--no-report", "--parallel", "2", "--no-share"]  # the copies have one identity: never shared here
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=hang_s(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "results"


@pytest.mark.slow
@pytest.mark.parametrize("where", list(POINTS))
def test_trial_killed_finishes_identically(where, matrix):
    keep = POINTS[where][1]
    reference = outcome(matrix, REFERENCE)
    assert [t.state for t in reference["trials"]] == [optuna.trial.TrialState.COMPLETE]  # never killed
    got = outcome(matrix, keep)
    states = [t.state for t in got["trials"]]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed attempt, retried
    (killed,) = [t for t in got["trials"] if t.state == optuna.trial.TrialState.FAIL]
    assert "ended without a result or an error: killed" in killed.user_attrs["failure_reason"]
    assert got["probes"] == ["probe.json"]
    epochs = [r["epoch"] for r in got["metrics"] if r["kind"] == "epoch"]
    steps = [r["step"] for r in got["metrics"] if r["kind"] == "step"]
    assert epochs == [1, 2] and steps == sorted(set(steps)) and len(steps) == 16  # nothing duplicated
    assert got["metrics"] == reference["metrics"]
    attempts = read_jsonl(run_dir(matrix, keep) / "attempts.jsonl")
    assert len(attempts) == 2 and {a["runtime"]["threads"] for a in attempts} == {1}  # the study's setting
    assert got["probe"] == reference["probe"]
    a, b = got["state"]["model"], reference["state"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
