"""Worker mode: N processes (local, or a SLURM job array) pull enqueued grid trials from one shared
storage, each running pretraining + probe in-process (harness.execution.trial).

This is Optuna's distributed pattern, with the loop of `Study.optimize` written out so that a
database outage costs no trial: ask, heartbeat while training, tell — each storage call retried
through an outage. On PostgreSQL/MySQL a worker that dies (node failure, SIGKILL) leaves a RUNNING
trial whose heartbeat goes stale; the next worker that looks fails it and re-enqueues a copy
(RetryHeartbeatStaleTrialCallback), which resumes from the same run directory's checkpoint. After an
outage nobody judges heartbeats until a grace period has passed with the database up (storage.py).
Workers exit when nothing is waiting or running.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import optuna
import submitit

from harness.execution.optuna_adapter import COMPLETE, FAIL, PRUNED, RUNNING, WAITING, heartbeat
from harness.execution.storage import Outage, PatientRDBStorage, open_storage
from harness.execution.trial import PruningReporter, failure_attrs, make_spec, objective_result, run_trial
from harness.planning.studyfile import load_study_file, make_pruner
from harness.run import trial_record as record
from harness.run.outcome import Outcome
from harness.run.snapshot import restore_cwd

OUTAGE_LIMIT_S = 3600.0  # a worker waits out a database outage this long before it gives up


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
        self.storage = storage
        self.outage = Outage(self.storage_url, OUTAGE_LIMIT_S, "the driver's command", who="worker", storage=storage)
        ostudy = self._patiently(lambda: optuna.load_study(
            study_name=self.name, storage=storage, pruner=make_pruner(study.pruner, epochs, study.pruner_args)))
        done = 0
        while True:
            trial = self._patiently(lambda: self._next_trial(ostudy))
            if trial is None:
                return done
            if trial == "wait":
                time.sleep(1.0)  # a trial may still go stale and come back: stay to pick it up
                continue
            with heartbeat(ostudy, trial):
                state, value = self.run(study, trial)
            self._patiently(lambda: ostudy.tell(trial, value, state=state, skip_if_finished=True))  # noqa: B023 (called now)
            done += 1

    def _patiently(self, call):
        """`call()`, again and again through a database outage (Outage says what it waits for)."""
        return self.outage.patiently(call)

    def _next_trial(self, ostudy: optuna.Study):
        """A waiting trial (asked), 'wait' while others run, None when the study is done."""
        if not isinstance(self.storage, PatientRDBStorage) or self.storage.judges_heartbeats():
            optuna.storages.fail_stale_trials(ostudy)  # no-op without heartbeats (SQLite, journal)
        states = [t.state for t in ostudy.get_trials(deepcopy=False)]
        if WAITING not in states:
            return "wait" if RUNNING in states else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is for optimize()": this loop is optimize's, written out
            trial = ostudy.ask()
        if record.KEY not in trial.user_attrs:  # another worker took the last waiting trial between look and ask
            trial.set_user_attr(record.OUTCOME, "idle")
            ostudy.tell(trial, state=PRUNED)
            return "wait"
        return trial

    def run(self, study, trial: optuna.trial.Trial) -> tuple[optuna.trial.TrialState, float | None]:
        """Train the trial; its Optuna state and value. The storage calls before and after training
        wait out an outage; training itself never touches the database (the reporter skips)."""
        spec = self._patiently(lambda: self.start(study, trial))
        reporter = PruningReporter(trial) if study.pruner != "none" else None
        try:
            result = run_trial(spec, self.threads, reporter, attempt={"job_id": _job_id(), "trial": trial.number})
        except Exception as exc:  # noqa: BLE001  (recorded; the driver's next round retries it)
            print(f"[worker] trial {trial.number} ({spec.key}) failed: {type(exc).__name__}: {exc}", flush=True)
            attrs = failure_attrs(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
            def record_failure() -> None:
                for name, value in attrs.items():
                    if value is not None:
                        trial.set_user_attr(name, value)

            self._patiently(record_failure)
            return FAIL, None
        try:
            return COMPLETE, self._patiently(lambda: objective_result(trial, result))
        except optuna.TrialPruned:
            return PRUNED, None
        except Exception as exc:  # noqa: BLE001  (diverged, or no final status: attributes say which)
            print(f"[worker] trial {trial.number} ({spec.key}): {exc}", flush=True)
            return FAIL, None

    def start(self, study, trial: optuna.trial.Trial):
        """The trial's point (its enqueued parameters), spec and attributes."""
        params = {key: trial.suggest_categorical(key, levels) for key, levels in study.factors.items()}
        params["seed"] = trial.suggest_categorical("seed", study.seeds)
        spec = make_spec(study, params, Path(self.results_dir), self.recipe, self.extra, self.gpus)
        for name, value in {**spec.attrs, record.EXECUTOR: "worker", record.JOB_ID: _job_id()}.items():
            trial.set_user_attr(name, value)
        return spec


def _job_id() -> str:
    """The worker's submitit job id (shown by --status), or its pid outside a submitit job."""
    try:
        return f"worker {submitit.JobEnvironment().job_id}"
    except RuntimeError:
        return f"worker pid {os.getpid()}"
