"""Plans: which trials a study runs next. Grid (every point), adaptive (a race over the levels,
harness.planning.decide) and search (Optuna's sampler asks). A plan decides and says; it never prints
(the driver does, `news`)."""
from __future__ import annotations

from typing import Any

import optuna

from harness.execution.optuna_adapter import COMPLETE, FAIL, FINAL, RUNNING, WAITING, enqueued_params
from harness.planning.decide import RaceState, level_label, level_of, race, summary, values_by_level
from harness.planning.studyfile import Study, trial_key
from harness.run import trial_record as record
from harness.run.outcome import Outcome, state_label


def point_of(t: optuna.trial.FrozenTrial) -> str:
    """The grid point a trial stands for: its key once asked, its enqueued parameters while WAITING
    (a driver killed between enqueue_trial and ask leaves such a trial; it is popped next round, and
    its point must not be enqueued a second time)."""
    if record.KEY in t.user_attrs:
        return t.user_attrs[record.KEY]
    enqueued = enqueued_params(t) if t.state == WAITING else {}
    return trial_key(enqueued) if enqueued else f"#{t.number}"


class GridPlan:
    """Every level x seed once; failed points again while retries last; diverged ones never."""

    def __init__(self, study: Study, points: list[tuple[dict, Any]]):
        self.study, self.points = study, points
        self.total = len(points)

    def pending(self, trials) -> list[dict]:
        """Grid points that still need a job: never tried, or failed with retries left."""
        grouped: dict[str, list] = {}
        for t in trials:
            grouped.setdefault(point_of(t), []).append(t)
        todo = []
        for params, _ in self.points:
            tries = grouped.get(trial_key(params), [])
            if any(t.state in FINAL or t.state in (RUNNING, WAITING) for t in tries):
                continue
            if any(not (Outcome.of_trial(t.user_attrs) or Outcome.FAILED).retryable for t in tries if t.state == FAIL):
                continue  # diverged ("fail" in the paper) is a result, not an accident: never retried
            if sum(t.state == FAIL and not t.user_attrs.get(record.NEVER_RAN) for t in tries) <= self.study.retries:
                todo.append(params)
        return todo

    def todo(self, trials, free: int | None) -> list[dict]:
        """Trials left WAITING (e.g. by a worker-mode run) go first ({}), then new grid points.
        `free`: how many may start now (None: all, a scheduler queues them)."""
        todo = [{}] * sum(t.state == WAITING for t in trials) + self.pending(trials)
        return todo if free is None else todo[:free]

    def finished(self, trials) -> bool:
        return not self.pending(trials) and not any(t.state == WAITING for t in trials)

    def news(self, trials) -> str | None:  # a grid has nothing to say between rounds
        return None

    def ask(self, ostudy: optuna.Study, params: dict | None) -> tuple[optuna.trial.Trial, dict]:
        if params:
            ostudy.enqueue_trial(params)
        trial = ostudy.ask()  # pops the oldest waiting trial
        fixed = {key: trial.suggest_categorical(key, levels) for key, levels in self.study.factors.items()}
        fixed["seed"] = trial.suggest_categorical("seed", self.study.seeds)
        return trial, fixed


class AdaptivePlan(GridPlan):
    """A race over the levels (harness.planning.decide): every level starts with `initial` seeds; after each
    round the undecided levels and the best get one more seed, submitted together; decided levels
    stop. Its state is replayed from the storage on every look, so a killed driver resumes it exactly."""

    def __init__(self, study: Study, points: list[tuple[dict, Any]]):
        super().__init__(study, points)
        self.factors = list(study.factors)
        self.levels = list(dict.fromkeys(level_of(p, self.factors) for p, _ in points))
        self.said = ""  # the race's last summary line, as news() returned it
        if study.race is None:
            raise ValueError("an adaptive plan needs the study's race (decide: and seeds: {initial, max})")
        self.race = study.race

    def state(self, trials) -> RaceState:
        rows = [{**t.params, "seed": t.params.get("seed"), "state": state_label(t.state.name, t.user_attrs),
                 "value": t.value if t.state == COMPLETE else None} for t in trials]
        values, _ = values_by_level(rows, self.factors, self.levels, "value", self.study.seeds)
        return race(values, self.race, self.study.direction == "maximize")

    def news(self, trials) -> str | None:
        """The race's summary when it changed since the last call (the driver prints it)."""
        line = summary(self.state(trials), lambda level: level_label(level, self.factors))
        if line and line != self.said:
            self.said = line
            return line
        return None

    def pending(self, trials) -> list[dict]:
        wanted = self.state(trials).seeds
        return [p for p in super().pending(trials)
                if level_of(p, self.factors) in wanted
                and self.study.seeds.index(p["seed"]) < wanted[level_of(p, self.factors)]]


class SearchPlan:
    """TPE chooses; `n_trials` results (diverged ones count), failures retried within a budget."""

    def __init__(self, study: Study, parallel: int):
        self.study, self.parallel = study, parallel
        self.total = study.n_trials

    def budget(self, trials) -> int:
        counted = sum(t.state != FAIL or Outcome.of_trial(t.user_attrs) is Outcome.DIVERGED for t in trials)
        return self.study.n_trials - counted

    def retries_left(self, trials) -> bool:
        return sum(t.state == FAIL for t in trials) <= self.study.retries * self.study.n_trials

    def todo(self, trials, free: int | None) -> list[None]:
        if not self.retries_left(trials):
            return []
        running = sum(t.state == RUNNING for t in trials)
        # TPE learns from results: never more than `parallel` at once, on SLURM too.
        free = self.parallel - running if free is None else free
        return [None] * max(0, min(free, self.budget(trials)))

    def finished(self, trials) -> bool:
        return self.budget(trials) <= 0 or not self.retries_left(trials)

    def news(self, trials) -> str | None:
        return None

    def ask(self, ostudy: optuna.Study, _params) -> tuple[optuna.trial.Trial, dict]:
        trial = ostudy.ask()  # the sampler chooses
        chosen: dict[str, Any] = {}
        for key, spec in self.study.factors.items():
            if isinstance(spec, list):
                chosen[key] = trial.suggest_categorical(key, spec)
            elif spec["type"] == "categorical":
                chosen[key] = trial.suggest_categorical(key, spec["choices"])
            elif spec["type"] == "int":
                chosen[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False),
                                                step=spec.get("step", 1))
            else:
                chosen[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False),
                                                  step=spec.get("step"))
        chosen["seed"] = self.study.seeds[0]
        return trial, chosen


