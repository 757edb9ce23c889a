"""Outages: a study rides through a database or a SLURM controller restart (real servers, stopped
for 20 s mid-study), and says clearly when an outage outlasts its limit."""
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from timing import hang_s, wait_until

from harness.run.runio import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
STUDY = """\
description: a trial long enough to be mid-run during an outage; a pruner that reports every epoch, never prunes
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=256, data.test_subset=256, optim.batch_size=64, optim.epochs=4,
            moco.queue_size=256, moco.bn_splits=4, eval.pixel_floor=false, eval.knn_test_subset=128, eval.knn_every=1]
factors: {moco.momentum: [0.99]}
seeds: [0]
pruner: {type: threshold, lower: 0.0}
retries: 1
resources: {cpus: 1, mem_gb: 2, time_min: 10}
"""
OUTAGE_S = 20  # longer than a worker may stay silent (8 s below) and than the first backoffs
# Each trial's first attempt sleeps 8 s after every epoch: still training through the whole outage
# (3 epochs x 8 s left when it starts) on a machine of any speed, at little CPU.
PACE = {"HARNESS_FAULT": "pace@8"}
# A study's momenta: one trial rides an outage as two do; worker mode has two workers, a trial each.
LEVELS = {"pg_workers": (0.9, 0.99)}


def start(results: Path, study: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "harness.study", str(study), "--poll", "0.5", "--no-report", *args]
    env = {**os.environ, "HARNESS_RESULTS": str(results), "PYTHONUNBUFFERED": "1", **PACE, **(env or {})}
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def levels(name: str) -> tuple[float, ...]:
    return LEVELS.get(name, (0.99,))  # STUDY's own


def study_text(name: str) -> str:
    return STUDY.replace("[0.99]", str(list(levels(name))))


def runs(results: Path, name: str) -> list[Path]:
    return [results / name / "runs" / f"momentum={m},seed=0" for m in levels(name)]


def epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]


def all_training(results: Path, name: str) -> bool:
    return all(epochs(r) for r in runs(results, name))


def assert_complete_once(storage, name: str, results: Path, attempts: int = 1) -> None:
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    keys = sorted(run.name for run in runs(results, name))
    assert sorted(t.user_attrs["key"] for t in done) == keys, [(t.state, t.user_attrs.get("failure_reason")) for t in trials]
    assert len(trials) == len(keys)  # nothing failed, nothing ran twice
    for run in runs(results, name):
        assert epochs(run) == [1, 2, 3, 4]  # every epoch exactly once
        assert len(read_jsonl(run / "attempts.jsonl")) == attempts


def through_an_outage(tmp_path: Path, studies: dict, stop, restart, env: dict | None = None):
    """Run each study (name -> the driver's arguments) at once; once all their trials train,
    stop a server for OUTAGE_S and start it again. Every command must then finish by itself.
    Returns the results directory and each driver's (stdout, stderr)."""
    results = tmp_path / "results"
    drivers = {}
    for name, args in studies.items():
        study = tmp_path / f"{name}.yaml"
        study.write_text(study_text(name))
        drivers[name] = start(results, study, *args, env=env)
    wait_until(lambda: all(all_training(results, name) for name in studies), "every trial to train")
    stop()
    time.sleep(OUTAGE_S)
    restart()
    outputs = {}
    for name, driver in drivers.items():
        outputs[name] = driver.communicate(timeout=hang_s())
        assert driver.returncode == 0, outputs[name][1][-3000:]
    return results, outputs


@pytest.mark.slow
def test_driver_and_workers_ride_through_a_postgres_restart(tmp_path, postgres):
    """One outage, two studies on the same server: the driver's rounds wait it out, and so do worker-mode
    workers, whose heartbeats (every 2 s; silent for 8 s counts as dead) fail during it, yet no trial
    is failed as stale or run twice."""
    local = ["--executor", "local", "--storage", postgres.url()]
    results, outputs = through_an_outage(tmp_path, {"pg_outage": local,
                                                    "pg_workers": [*local, "--workers", "2", "--heartbeat", "2"]},
                                         postgres.stop, postgres.restart)
    out, err = outputs["pg_outage"]
    assert "does not answer" in err and "answers again" in err and "Traceback" not in err
    assert "Heartbeat of storage" not in err  # the driver runs no trial: no heartbeat, no warning
    assert_complete_once(postgres.url(), "pg_outage", results)
    # The jobs never met the outage (they do not open the storage): the driver relayed every epoch's
    # kNN to the pruner, the ones reported while the database was down once it answered again.
    for t in optuna.load_study(study_name="pg_outage", storage=postgres.url()).get_trials():
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
    study_obj = optuna.load_study(study_name="pg_outage", storage=postgres.url())
    assert study_obj.metric_names == ["probe_top1"]  # what optuna-dashboard labels the objective
    workers_out, workers_err = outputs["pg_workers"]
    assert "Traceback" not in workers_err
    assert_complete_once(postgres.url(), "pg_workers", results)
    assert all(postgres.password not in o + e for o, e in outputs.values())


@pytest.mark.slow
def test_an_outage_past_the_limit_ends_the_driver_with_one_line_and_a_rerun_finishes(tmp_path, postgres):
    study = tmp_path / "pg_limit.yaml"
    study.write_text(study_text("pg_limit"))
    results = tmp_path / "results"
    args = ["--executor", "local", "--storage", postgres.url(), "--db-outage-limit", "0.1"]
    driver = start(results, study, *args)
    wait_until(lambda: all_training(results, "pg_limit"), "the trial to train")
    postgres.stop()
    try:
        _, err = driver.communicate(timeout=hang_s())
        assert driver.returncode == 2 and "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: the study's database postgresql") and "has not answered for" in last
        assert f"re-attach with: python -m harness.study {study}" in last and postgres.password not in err
    finally:
        postgres.restart()
    again = start(results, study, *args)  # the same command, as the line says
    _, err = again.communicate(timeout=hang_s())
    assert again.returncode == 0, err[-3000:]
    assert_complete_once(postgres.url(), "pg_limit", results)


@pytest.mark.slow
def test_driver_rides_through_a_slurm_controller_restart(tmp_path, slurm):
    results, _ = through_an_outage(tmp_path, {"ctld_outage": ["--executor", "slurm", "--parallel", "2"]},
                                   lambda: slurm.stop_daemon("slurmctld"), slurm.restart_controller, env=slurm.env)
    assert_complete_once(f"sqlite:///{results / 'ctld_outage' / 'study.db'}", "ctld_outage", results)


def test_no_heartbeat_is_judged_until_a_grace_period_after_an_outage(tmp_path):
    """The rule that keeps alive workers alive through an outage, deterministically: a trial whose
    heartbeat is stale is failed by a worker that looks, but not while the database has been back
    for less than a grace period (its worker's beats could not be written during the outage)."""
    import optuna

    from harness.execution.storage import PatientRDBStorage
    from harness.execution.worker import WorkerJob

    storage = PatientRDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="hb", storage=storage)
    study.enqueue_trial({"x": 1.0}, user_attrs={"key": "x=1.0"})
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # stale: no beat for longer than the grace period (SQLite keeps whole seconds)
    worker = WorkerJob("", "hb", "", None, [], str(tmp_path), 0, 1, 0)
    worker.storage = storage
    storage.saw_outage()  # the database just came back
    assert worker._next_trial(study) == "wait"
    assert study.get_trials()[0].state == optuna.trial.TrialState.RUNNING  # not judged yet
    time.sleep(1.2)  # a grace period with the database up: the trial's worker would have beaten by now
    worker._next_trial(study)
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL  # judged: it really is silent
