"""One trial's lifecycle, the same in driver mode (a job per trial) and worker mode (workers pull
trials from the storage):

  TrialSpec        built and validated once from a study point: key, run directory, run config
  run_trial()      runs it: attempt record, pruning reporter, training + probe, the result
  tell()/objective_result()   the result onto Optuna, from the driver or from inside a worker

The run directory is the source of truth: a result is always read back from it (read_trial_result).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.planning.studyfile import Study, trial_key
from harness.run import evaluations, faults, process
from harness.run import trial_record as record
from harness.run.config import RunConfig
from harness.run.errors import StudyError
from harness.run.outcome import Outcome
from harness.run.trial_result import TrialResult, read_trial_result

if TYPE_CHECKING:  # a job imports this module: Optuna and SQLAlchemy only where a storage is used
    import optuna


@dataclass(frozen=True)
class TrialSpec:
    key: str  # readable identity of the study point, the run directory's name
    params: dict[str, Any]  # factor levels and seed
    run_dir: Path
    config: RunConfig  # validated once, here; jobs receive it as is
    objective: str
    gpus: int  # per trial, for GPU-hours

    @property
    def attrs(self) -> dict[str, Any]:
        """What the storage records about the spec as soon as a trial is assigned it."""
        return {record.KEY: self.key, record.RUN_DIR: f"runs/{self.key}",  # relative to the study directory: it can move
                "seed": self.params.get("seed"), record.IDENTITY: self.config.digest()}

    @property
    def probe(self) -> dict | None:
        """The probe settings whose result is this trial's (None: eval.probe none)."""
        return evaluations.of(self.config)


def make_spec(study: Study, params: dict, study_dir: Path, recipe: str | None, extra: list[str],
              gpus: int = 0) -> TrialSpec:
    """Raises ConfigError for a point the recipe cannot run (a search may sample one)."""
    key = trial_key(params)
    config = study.run_config(params, recipe, extra, run_name=f"{study_dir.name}/{key}")
    return TrialSpec(key, dict(params), study_dir / "runs" / key, config, study.objective, gpus)


class PruningReporter:
    """After each epoch: the kNN monitor to the study's pruner; True when it says stop.

    A database that does not answer never stops the training: that epoch's report is skipped (said
    once), and the run directory keeps the value. `trial` may be a function that opens the trial,
    called on the first report that reaches the database."""

    def __init__(self, trial: optuna.trial.Trial | Callable[[], optuna.trial.Trial]):
        self._trial, self.skipped = trial, 0

    def __call__(self, epoch: int, record: dict) -> bool:
        if record.get("knn_top1") is None:
            return False
        import optuna

        from harness.execution.storage import OUTAGE_ERRORS

        try:
            if not isinstance(self._trial, optuna.trial.Trial):
                self._trial = self._trial()
            self._trial.report(record["knn_top1"], step=epoch)
            return self._trial.should_prune()
        except (*OUTAGE_ERRORS, StudyError) as exc:  # StudyError: the storage could not be opened
            if not self.skipped:
                print(f"[trial] the study's database does not answer ({type(exc).__name__}); epoch {epoch}'s kNN "
                      f"is not reported to the pruner and training goes on (metrics.jsonl keeps it).", flush=True)
            self.skipped += 1
            return False


def run_trial(spec: TrialSpec, threads: int = 0, reporter: Callable[[int, dict], bool] | None = None,
              attempt: dict | None = None, probe: bool = True) -> TrialResult:
    """Train (resuming whatever the run directory holds) and probe; the result as the directory says.

    Args:
        spec: the trial's point, run directory and validated config.
        threads: the job's share of its CPUs, used where the study leaves runtime.threads at 0.
        reporter: called after each epoch with (epoch, record); True prunes the run.
        attempt: what the caller knows of this attempt (job id, trial), kept in attempts.jsonl.
        probe: probe a completed run here (False: its evaluation is a job of its own, harness.execution.jobs.EvalJob).

    Returns:
        The TrialResult read back from the run directory (outcome, objective value, attributes).

    Raises:
        ConfigError: a run directory that holds another run (train refuses to mix them).
        Exception: whatever the training raised (a crash); the driver records it as FAILED and retries.
    """
    faults.raise_point("raise-once", spec.run_dir)  # an injected failure costs no torch start-up
    with process.start_up():  # a job's process: torch, imported now, lives until it exits
        from harness.training.pretrain import train  # the driver process never trains: torch's start-up stays in the jobs
    cfg = spec.config
    if threads and not cfg.runtime.threads:
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=threads))
    train(cfg, spec.run_dir, on_epoch=reporter, attempt=attempt, wait_for_lock=True, probe=probe)
    return read_trial_result(spec.run_dir, spec.objective, spec.gpus, spec.probe)


def failure_attrs(outcome: Outcome, reason: str | None) -> dict:
    return {record.OUTCOME: outcome.value, record.FAILURE_REASON: reason[:500] if reason else None}


def tell(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial, result: TrialResult) -> None:
    """The driver records a finished job's result on its RUNNING trial."""
    from harness.execution.optuna_adapter import FAIL, PRUNED, set_running_attrs

    set_running_attrs(study, trial, {**result.attrs, **failure_attrs(result.outcome, result.reason)})
    if result.outcome is Outcome.COMPLETED:
        study.tell(trial.number, result.value)
    elif result.outcome is Outcome.PRUNED:
        study.tell(trial.number, state=PRUNED)
    else:
        study.tell(trial.number, state=FAIL)


def tell_failure(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial, outcome: Outcome,
                 reason: str) -> None:
    tell(study, trial, TrialResult(outcome, None, {}, reason))


class Diverged(RuntimeError):
    """The run's loss became NaN/inf: a result ('fail' in the paper), recorded as FAIL."""


def objective_result(trial: optuna.trial.Trial, result: TrialResult) -> float:
    """Inside a worker's objective: the value to return, or the exception Optuna expects."""
    for name, value in {**result.attrs, **failure_attrs(result.outcome, result.reason)}.items():
        if value is not None:
            trial.set_user_attr(name, value)
    if result.outcome is Outcome.COMPLETED:
        assert result.value is not None  # read_trial_result: a completed run without its objective is FAILED
        return result.value
    if result.outcome is Outcome.PRUNED:
        import optuna

        raise optuna.TrialPruned()
    if result.outcome is Outcome.DIVERGED:
        raise Diverged(result.reason)
    raise RuntimeError(result.reason or "the run ended without a final status")
