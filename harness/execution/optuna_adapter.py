"""The harness's only uses of Optuna beyond its public API, in one place.

The driver tells Optuna the outcome of trials that ran in *other* processes (submitit jobs), so it
needs two things `optuna.Study` does not offer: user attributes on a RUNNING trial it holds only as a
FrozenTrial, and a `Trial` handle for a trial id inside a job (to report the kNN monitor to the
pruner). Both are stable in Optuna 3-4; should they move, this is the file to change.
"""
from __future__ import annotations

import optuna

# The trial states the harness acts on, named once (execution's modules import them from here).
COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
RUNNING, WAITING = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING
FINAL = (COMPLETE, PRUNED)  # told and never retried


def trial_id(trial: optuna.trial.BaseTrial) -> int:
    """The storage's id of a trial (unique across studies; `number` is per study)."""
    return trial._trial_id  # type: ignore[attr-defined]  # noqa: SLF001  (every trial class has it)


def set_running_attrs(study: optuna.Study, trial: optuna.trial.BaseTrial, attrs: dict) -> None:
    """User attributes of a trial that is still RUNNING (Optuna freezes them once it is told)."""
    for name, value in attrs.items():
        if value is not None:
            study._storage.set_trial_user_attr(trial_id(trial), name, value)  # noqa: SLF001


def enqueued_params(trial: optuna.trial.FrozenTrial) -> dict:
    """The parameters a WAITING trial was enqueued with (`Study.enqueue_trial` keeps them in a
    system attribute until `ask()` pops the trial): its point, before it has any user attribute."""
    return dict(trial.system_attrs.get("fixed_params") or {})


def trial_handle(study: optuna.Study, trial_id_: int) -> optuna.trial.Trial:
    """A live `Trial` for an id made elsewhere: a job reports intermediate values through it."""
    return optuna.trial.Trial(study, trial_id_)


def heartbeat(study: optuna.Study, trial: optuna.trial.BaseTrial):
    """Optuna's heartbeat thread for a trial, as `Study.optimize` runs it (a no-op context without
    heartbeats). Workers run trials themselves, so that a result can be told again after an outage."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial_id(trial), study._storage)  # noqa: SLF001
