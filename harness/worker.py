"""Worker mode: N processes (local, or a SLURM job array) pull enqueued grid trials from one shared
storage with `study.optimize()`, each running pretraining + probe in-process (harness.trial).

This is Optuna's distributed pattern. On PostgreSQL/MySQL each worker beats a heartbeat; a worker
that dies (node failure, SIGKILL) leaves a RUNNING trial whose heartbeat goes stale, and the next
worker that looks fails it and re-enqueues a copy (RetryHeartbeatStaleTrialCallback), which resumes
from the same run directory's checkpoint. Workers exit when nothing is waiting or running.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
import submitit

from .outcome import Outcome
from .snapshot import restore_cwd
from .storage import open_storage
from .studyfile import load_study_file, make_pruner
from .trial import PruningReporter, failure_attrs, make_spec, objective_result, run_trial

WAITING, RUNNING = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING


class WorkerJob(submitit.helpers.Checkpointable):
    def __init__(self, study_file: str, name: str, storage_url: str, recipe: str | None, extra: list[str],
                 results_dir: str, threads: int, heartbeat_s: int, gpus: int):
        """`study_file`: the copy stored with the study's results (what the driver validated)."""
        self.study_file, self.name, self.storage_url = study_file, name, storage_url
        self.recipe, self.extra, self.results_dir = recipe, extra, results_dir
        self.threads, self.heartbeat_s, self.gpus = threads, heartbeat_s, gpus

    def __call__(self) -> int:
        restore_cwd()
        study = load_study_file(Path(self.study_file), self.name.split("@")[0])
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
        if "key" not in trial.user_attrs:  # enqueued trials (and their heartbeat retries) carry their key
            # Another worker took the last waiting trial between our look and our ask.
            trial.set_user_attr("outcome", "idle")
            raise optuna.TrialPruned("no waiting trial")
        params = {key: trial.suggest_categorical(key, levels) for key, levels in study.factors.items()}
        params["seed"] = trial.suggest_categorical("seed", study.seeds)
        spec = make_spec(study, params, Path(self.results_dir), self.recipe, self.extra, self.gpus)
        job_id = _job_id()
        for name, value in {**spec.attrs, "executor": "worker", "job_id": job_id}.items():
            trial.set_user_attr(name, value)
        reporter = PruningReporter(trial) if study.pruner != "none" else None
        try:
            result = run_trial(spec, self.threads, reporter, attempt={"job_id": job_id, "trial": trial.number})
        except Exception as exc:  # recorded, then FAIL; the driver's next round retries it
            for name, value in failure_attrs(Outcome.FAILED, f"{type(exc).__name__}: {exc}").items():
                trial.set_user_attr(name, value)
            raise
        return objective_result(trial, result)


def _job_id() -> str:
    """The worker's submitit job id (shown by --status), or its pid outside a submitit job."""
    try:
        return f"worker {submitit.JobEnvironment().job_id}"
    except RuntimeError:
        return f"worker pid {os.getpid()}"
