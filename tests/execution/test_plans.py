"""Plans (harness.execution.plans) against a real Optuna storage, in the states a killed driver leaves."""
import itertools

import optuna

from harness.execution.plans import AdaptivePlan, GridPlan
from harness.planning.studyfile import load_study, trial_key


def grid(name: str):
    """A shipped study and its grid points (levels x seeds), as the driver hands them to a plan."""
    study = load_study(name)
    points = [({**dict(zip(study.factors, levels)), "seed": seed}, None)
              for levels in itertools.product(*study.factors.values()) for seed in study.seeds]
    return study, points


def test_a_point_left_waiting_by_a_killed_driver_is_asked_once_not_twice(tmp_path):
    """The driver enqueues a point, then asks for it; killed in between, the point is a WAITING trial
    with no key yet. The next round pops it ({}) and must not enqueue its point again: two trials of
    one point would both train (the race study's duplicate COMPLETE trials)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name, plan_type in (("smoke", GridPlan), ("momentum_race", AdaptivePlan)):
        study, points = grid(name)
        ostudy = optuna.create_study(storage=f"sqlite:///{tmp_path / name}.db", study_name=name)
        left, *_ = points
        ostudy.enqueue_trial(left[0])  # ... and the driver was killed before ask()
        plan = plan_type(study, points)
        todo = plan.todo(ostudy.get_trials(), None)
        keys = [trial_key(p) for p in todo if p]
        assert todo.count({}) == 1 and trial_key(left[0]) not in keys, name
        trial, params = plan.ask(ostudy, {})  # the round pops the waiting trial: that point, once
        assert trial_key(params) == trial_key(left[0])
