"""Worker mode: N processes (local, or a SLURM job array) pull enqueued grid trials from one shared
storage with `study.optimize()`, each running pretraining + probe in-process.

This is Optuna's distributed pattern. On PostgreSQL/MySQL each worker beats a heartbeat; a worker
that dies (node failure, SIGKILL) leaves a RUNNING trial whose heartbeat goes stale, and the next
worker that looks fails it and re-enqueues a copy (RetryHeartbeatStaleTrialCallback), which resumes
from the same run directory's checkpoint. Workers exit when nothing is waiting or running.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import optuna
import submitit

from .launch import machine_description
from .snapshot import code_origin, restore_cwd
from .storage import open_storage
from .studyfile import load_study, make_pruner, trial_key
from .trial_result import read_trial_result

WAITING, RUNNING = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING


class Diverged(RuntimeError):
    """The run's loss became NaN/inf: a result ('fail' in the paper), recorded as FAIL."""


class WorkerJob(submitit.helpers.Checkpointable):
    def __init__(self, study_file: str, name: str, storage_url: str, recipe: str | None, extra: list[str],
                 results_dir: str, threads: int, heartbeat_s: int, gpus: int):
        self.study_file, self.name, self.storage_url = study_file, name, storage_url
        self.recipe, self.extra, self.results_dir = recipe, extra, results_dir
        self.threads, self.heartbeat_s, self.gpus = threads, heartbeat_s, gpus

    def __call__(self) -> int:
        restore_cwd()
        study = load_study(self.study_file)
        storage = open_storage(self.storage_url, self.heartbeat_s, max_retry=study.retries)
        epochs = study.run_config(study.grid()[0], self.recipe, self.extra).optim.epochs
        ostudy = optuna.load_study(study_name=self.name, storage=storage,
                                   pruner=make_pruner(study.pruner, epochs, study.pruner_args))
        done = 0
        while True:
            optuna.storages.fail_stale_trials(ostudy)  # no-op without heartbeats (SQLite, journal)
            states = [t.state for t in ostudy.get_trials(deepcopy=False)]
            if WAITING not in states:
                if RUNNING not in states:
                    return done
                time.sleep(1.0)  # a trial may still go stale and come back: stay to pick it up
                continue
            ostudy.optimize(lambda trial: self.objective(study, trial), n_trials=1, catch=(Exception,))
            done += 1

    def objective(self, study, trial: optuna.trial.Trial) -> float:
        from .train import train

        if "key" not in trial.user_attrs:  # enqueued trials (and their heartbeat retries) carry their key
            # Another worker took the last waiting trial between our look and our ask.
            trial.set_user_attr("outcome", "idle")
            raise optuna.TrialPruned("no waiting trial")
        params = {key: trial.suggest_categorical(key, levels) for key, levels in study.factors.items()}
        params["seed"] = trial.suggest_categorical("seed", study.seeds)
        key = trial_key(params)
        run_dir = Path(self.results_dir) / "runs" / key
        run_dir.mkdir(parents=True, exist_ok=True)
        job_id = _job_id()
        with open(run_dir / "attempts.jsonl", "a") as fh:
            fh.write(json.dumps({"job_id": job_id, "pid": os.getpid(), "trial": trial.number,
                                 "host": socket.gethostname(), "start": time.time(),
                                 "machine": machine_description(), "code": code_origin()}) + "\n")
        for name, value in {"key": key, "run_dir": str(run_dir), "executor": "worker", "seed": params["seed"],
                            "job_id": job_id}.items():
            trial.set_user_attr(name, value)
        cfg = study.run_config(params, self.recipe, self.extra, run_name=f"{self.name}/{key}")
        if self.threads:
            cfg.runtime.threads = self.threads

        def on_epoch(epoch: int, record: dict):
            if record.get("knn_top1") is None or study.pruner == "none":
                return None
            trial.report(record["knn_top1"], step=epoch)
            return "prune" if trial.should_prune() else None

        try:
            train(cfg, run_dir, on_epoch=on_epoch)
        except Exception as exc:  # recorded, then FAIL; the driver's next round retries it
            trial.set_user_attr("outcome", "error")
            trial.set_user_attr("failure_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise
        result = read_trial_result(run_dir, study.objective, self.gpus)
        for name, value in {**result.attrs, "failure_reason": result.reason}.items():
            if value is not None:
                trial.set_user_attr(name, value)
        if result.outcome == "pruned":
            raise optuna.TrialPruned()
        if result.outcome == "diverged":
            raise Diverged(result.reason)
        if result.outcome != "completed":
            raise RuntimeError(result.reason or "the run ended without a final status")
        return result.value


def _job_id() -> str:
    """The worker's submitit job id (shown by --status), or its pid outside a submitit job."""
    try:
        return f"worker {submitit.JobEnvironment().job_id}"
    except RuntimeError:
        return f"worker pid {os.getpid()}"
