"""How a trial ended: one type, used by training (status.json), the study driver, workers and reports."""
from __future__ import annotations

from enum import Enum

from harness.run import trial_record as record

RUNNING = "running"  # status.json while a run is under way: a state, not an outcome


class Outcome(str, Enum):
    COMPLETED = "completed"  # trained and evaluated
    DIVERGED = "diverged"  # the loss became NaN/inf: a result (the paper's "fail"), never retried
    PRUNED = "pruned"  # stopped early by the study's pruner
    FAILED = "failed"  # an accident (crash, lost job, killed): retried up to the study's `retries`
    INVALID = "invalid"  # a sampled point the recipe cannot run: nothing was trained

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of_run(cls, status: str | None) -> Outcome:
        """The outcome a run directory's status.json says; anything but a final status is a failure."""
        return cls(status) if status in (cls.COMPLETED, cls.DIVERGED, cls.PRUNED) else cls.FAILED

    @classmethod
    def of_trial(cls, attrs: dict) -> Outcome | None:
        """The outcome recorded on a finished trial (older storages spelled FAILED 'error')."""
        value = attrs.get(record.OUTCOME)
        return cls.FAILED if value == "error" else (cls(value) if value in cls._value2member_map_ else None)

    @property
    def retryable(self) -> bool:
        return self is Outcome.FAILED

    @property
    def label(self) -> str:
        """The state a report shows: Optuna's, with DIVERGED and INVALID told apart from FAIL."""
        return {Outcome.COMPLETED: "COMPLETE", Outcome.PRUNED: "PRUNED", Outcome.FAILED: "FAIL"}.get(self,
                                                                                                      self.name)


def state_label(state: str, attrs: dict) -> str:
    """The state a report shows for a trial: Optuna's state name, FAIL told apart by outcome."""
    outcome = Outcome.of_trial(attrs)
    return outcome.label if state == "FAIL" and outcome else state
