"""Pruning without the storage on compute nodes: a job writes each epoch's kNN value to its run
directory and waits for the driver's decision there; the driver, which holds the only connection
to the study's storage, reports the value to Optuna and writes the pruner's answer back.

So the default SQLite storage stays on one machine (SQLite on a network filesystem is unsafe) and a
study of hundreds of jobs holds one database connection. Files, in `<run>/pruning/`:

  report-EEEEE.json     {"epoch": E, "value": kNN}       written by the job (rank 0)
  decision-EEEEE.json   {"epoch": E, "prune": bool}      written by the driver

A driver that does not answer within `wait_s` (stopped, or --no-wait) costs no training: the job goes
on as if told to continue, and a driver that starts later still records the value.
"""
from __future__ import annotations

import time
from pathlib import Path

from harness.run import runio

DIRECTORY = "pruning"


def _report(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / DIRECTORY / f"report-{epoch:05d}.json"


def _decision(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / DIRECTORY / f"decision-{epoch:05d}.json"


class RelayReporter:
    """The job's side: an EpochCallback (harness.training.pretrain) that asks the driver. It waits up to `wait_s`
    for each answer while the driver answers; once an answer did not come (the driver stopped, or is
    riding out an outage), it stops waiting and only looks: a decision that arrives later still stops
    the run at the next epoch, and waiting resumes once the driver answers again."""

    def __init__(self, run_dir: Path, wait_s: float):
        self.run_dir, self.wait_s, self.unanswered = Path(run_dir), wait_s, 0

    def __call__(self, epoch: int, record: dict) -> bool:
        if record.get("knn_top1") is None:
            return False
        decision = _decision(self.run_dir, epoch)
        if not decision.exists():  # a resumed attempt may find the answer to its first attempt's report
            _report(self.run_dir, epoch).parent.mkdir(exist_ok=True)
            runio.write_json(_report(self.run_dir, epoch), {"epoch": epoch, "value": record["knn_top1"]})
        deadline = time.monotonic() + (0 if self.unanswered else self.wait_s)
        while not decision.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if decision.exists():
            self.unanswered = 0
            return bool(runio.read_json(decision).get("prune"))
        if not self.unanswered:
            print(f"[trial] no pruning decision from the driver within {self.wait_s:.0f} s (epoch {epoch}); training "
                  f"goes on without waiting, the values wait in {decision.parent}.", flush=True)
        self.unanswered += 1
        return any(runio.read_json(d).get("prune") for d in decision.parent.glob("decision-*.json"))


def relay(trial, run_dir: Path) -> int:
    """The driver's side, for one running trial (an optuna Trial): every unanswered report goes to the
    pruner, in epoch order, and its decision back to the run directory. Returns how many it answered."""
    from harness.execution.optuna_adapter import trial_id  # the driver's side: jobs import no Optuna

    directory = Path(run_dir) / DIRECTORY
    if not directory.is_dir():
        return 0
    answered = 0
    for report in sorted(directory.glob("report-*.json")):
        data = runio.read_json(report)
        if not data or _decision(run_dir, data["epoch"]).exists():
            continue
        if data["epoch"] not in trial.storage.get_trial(trial_id(trial)).intermediate_values:
            trial.report(data["value"], step=data["epoch"])
        runio.write_json(_decision(run_dir, data["epoch"]), {"epoch": data["epoch"], "prune": trial.should_prune()})
        answered += 1
    return answered
