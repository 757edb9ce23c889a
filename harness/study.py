"""`python -m harness.study NAME`: run a whole ablation or search with Optuna and submitit.

    python -m harness.study momentum_sweep                      # run (or resume) it, wait, report
    python -m harness.study momentum_sweep --dry-run            # the plan; submits nothing
    python -m harness.study momentum_sweep --status             # where it stands
    python -m harness.study momentum_sweep --recipe imagenet-r50-v1 --executor slurm --no-wait

The driver is the only writer of final trial states. It reads each finished trial's run directory
(status.json, probe.json), so a driver killed and started again re-attaches to running jobs by id,
never reruns a completed trial, and retries lost or failed ones up to the study's `retries`.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from . import launch, pruning_relay, runio, shared, snapshot
from .config import ConfigError
from .datafiles import check_dataset
from .decide import RaceState, level_label, level_of, race, summary, values_by_level
from .estimate import estimate_line
from .optuna_adapter import set_running_attrs, trial_handle, trial_id
from .outcome import Outcome, state_label
from .report import build_report  # up front: a driver that ran for days must not report with newer code
from .storage import Outage, default_url, open_storage, redact
from .suite import main as suite_main, suite_path
from .studyfile import STUDY_COPY, Study, StudyError, load_study, load_study_file, make_pruner, trial_key, validate_levels
from .trial import failure_attrs, make_spec, tell, tell_failure
from .trial_result import read_trial_result

# How long a job waits for the driver's pruning decision after an epoch: the driver answers within a
# round (--poll seconds apart); a driver that does not answer costs one such wait (harness.pruning_relay).
RELAY_WAIT_S, RELAY_WAIT_POLLS = 5.0, 10

FINAL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING = optuna.trial.TrialState.RUNNING
WAITING = optuna.trial.TrialState.WAITING
FAIL = optuna.trial.TrialState.FAIL


@dataclass
class Options:
    """How to run a study (the command line's flags; a test or a notebook builds one directly)."""
    recipe: str | None = None  # swap the study's base recipe
    executor: str = "auto"  # auto | slurm | local | debug
    storage: str | None = None  # Optuna storage URL; default: SQLite in results/<study>/
    parallel: int = 2  # trials at once (array parallelism)
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, for every trial
    wait: bool = True  # wait for the trials, then report
    report: bool = True
    workers: int = 0  # worker mode: N processes pull trials from the storage
    heartbeat: int = 30  # worker heartbeat (PostgreSQL/MySQL)
    poll: float = 5.0  # seconds between looks at the jobs
    outage_limit_s: float = 1800.0  # how long the driver waits out a database that does not answer
    command: str = "python -m harness.study"  # the command line that re-attaches (passwords redacted)
    share: bool = True  # reuse runs other studies finished (harness.shared); False: train every point here


# ---------------------------------------------------------------- plans: which trials to run next

class GridPlan:
    """Every level x seed once; failed points again while retries last; diverged ones never."""

    def __init__(self, study: Study, points: list[tuple[dict, Any]]):
        self.study, self.points = study, points
        self.total = len(points)

    def pending(self, trials) -> list[dict]:
        """Grid points that still need a job: never tried, or failed with retries left."""
        grouped: dict[str, list] = {}
        for t in trials:
            grouped.setdefault(t.user_attrs.get("key", f"#{t.number}"), []).append(t)
        todo = []
        for params, _ in self.points:
            tries = grouped.get(trial_key(params), [])
            if any(t.state in FINAL or t.state in (RUNNING, WAITING) for t in tries):
                continue
            if any(not (Outcome.of_trial(t.user_attrs) or Outcome.FAILED).retryable for t in tries if t.state == FAIL):
                continue  # diverged ("fail" in the paper) is a result, not an accident: never retried
            if sum(t.state == FAIL and not t.user_attrs.get("never_ran") for t in tries) <= self.study.retries:
                todo.append(params)
        return todo

    def todo(self, trials, free: int | None) -> list[dict]:
        """Trials left WAITING (e.g. by a worker-mode run) go first ({}), then new grid points.
        `free`: how many may start now (None: all, a scheduler queues them)."""
        todo = [{}] * sum(t.state == WAITING for t in trials) + self.pending(trials)
        return todo if free is None else todo[:free]

    def finished(self, trials) -> bool:
        return not self.pending(trials) and not any(t.state == WAITING for t in trials)

    def ask(self, ostudy: optuna.Study, params: dict) -> tuple[optuna.trial.Trial, dict]:
        if params:
            ostudy.enqueue_trial(params)
        trial = ostudy.ask()  # pops the oldest waiting trial
        fixed = {key: trial.suggest_categorical(key, levels) for key, levels in self.study.factors.items()}
        fixed["seed"] = trial.suggest_categorical("seed", self.study.seeds)
        return trial, fixed


class AdaptivePlan(GridPlan):
    """A race over the levels (harness.decide): every level starts with `initial` seeds; after each
    round the undecided levels and the best get one more seed, submitted together; decided levels
    stop. Its state is replayed from the storage on every look, so a killed driver resumes it exactly."""

    def __init__(self, study: Study, points: list[tuple[dict, Any]]):
        super().__init__(study, points)
        self.factors = list(study.factors)
        self.levels = list(dict.fromkeys(level_of(p, self.factors) for p, _ in points))
        self.said = ""  # the race's last summary line printed

    def state(self, trials) -> RaceState:
        rows = [{**t.params, "seed": t.params.get("seed"), "state": state_label(t.state.name, t.user_attrs),
                 "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None} for t in trials]
        values, _ = values_by_level(rows, self.factors, self.levels, "value", self.study.seeds)
        return race(values, self.study.race, self.study.direction == "maximize")

    def pending(self, trials) -> list[dict]:
        state = self.state(trials)
        line = summary(state, lambda level: level_label(level, self.factors))
        if line and line != self.said:  # said once per change, as the race goes
            print(f"[study {self.study.name}] {line}", flush=True)
            self.said = line
        wanted = state.seeds
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


# ---------------------------------------------------------------- the driver

class Driver:
    def __init__(self, study: Study, opts: Options):
        self.opts = opts
        self.recipe = opts.recipe or study.recipe
        self.name = study.name + ("" if self.recipe == study.recipe else f"@{self.recipe}")
        self.dir = (runio.RESULTS / self.name).resolve()
        self.study = self._stored_study(study)
        self.study.check_overrides(opts.overrides, "--set")
        self.points, notes = validate_levels(self.study, opts.recipe, opts.overrides)  # impossible levels fail here
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        check_dataset(self.points[0][1])
        self.storage_url = opts.storage or default_url(self.dir)
        self.kind = launch.resolve_executor(opts.executor)
        self.epochs = self.points[0][1].optim.epochs
        self.resources = self.study.resources_for(self.recipe)
        self.gpus = self.resources.gpus * self.resources.nodes
        if opts.workers and self.resources.trials_per_job > 1:
            raise StudyError(f"{self.study.path}: resources.trials_per_job: packing is for the driver's jobs; "
                             f"--workers already runs one trial per worker process (drop one of them).")
        ranks = (self.resources.tasks or max(self.resources.gpus, 1)) * self.resources.nodes
        if opts.workers and ranks > 1:
            raise StudyError(f"{self.study.path}: resources: a trial here is {ranks} DDP processes (gpus "
                             f"{self.resources.gpus}, tasks {self.resources.tasks}, nodes {self.resources.nodes}); "
                             f"--workers runs one process per trial. Drop --workers (the driver's jobs run DDP), "
                             f"or give each trial one GPU (--set is not enough: resources.gpus: 1 in the study).")
        if opts.workers and (self.study.sampler != "grid" or self.study.race):
            raise StudyError("--workers: worker mode runs a fixed grid; searches and adaptive seeds need the "
                             "driver's rounds (drop --workers).")
        if self.kind != "slurm" and self.resources.nodes > 1:
            raise StudyError(f"{self.study.path}: resources.nodes: {self.resources.nodes} nodes per trial need "
                             f"SLURM; the {self.kind} executor runs on this machine only. Use --executor slurm "
                             f"or set resources.nodes to 1.")
        self.runs = shared.RunIndex(runio.RESULTS)  # finished runs of every study: shared, not trained twice
        if self.study.sampler != "grid":
            self.plan = SearchPlan(self.study, max(1, opts.parallel))
        else:
            self.plan = AdaptivePlan(self.study, self.points) if self.study.race else GridPlan(self.study, self.points)

    def _stored_study(self, given: Study) -> Study:
        """A study goes on with the file it started from (results/<study>/study.yaml): an edited
        studies/ file under a running study is reported, not silently used."""
        copy = self.dir / STUDY_COPY
        if not copy.exists():
            return given
        if copy.read_text() != given.path.read_text():
            print(f"note: {given.path} differs from the copy study '{self.name}' started from ({copy}); the "
                  f"study goes on with that copy. To run the edited file, give it another name (or another "
                  f"--storage and results directory).", file=sys.stderr)
        return load_study_file(copy, given.name)

    # -------------------------------------------------------------- setup
    def open(self) -> None:
        runio.check_writable(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock()
        if not (self.dir / STUDY_COPY).exists():
            runio.write_atomic(self.dir / STUDY_COPY, self.study.path.read_text())
        # Heartbeats belong to processes that run trials: workers, not the driver.
        storage = open_storage(self.storage_url, self.opts.heartbeat if self.opts.workers else None,
                               self.study.retries)
        sampler = (optuna.samplers.TPESampler(seed=0, constant_liar=True) if self.study.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=0))  # grid points are enqueued, never sampled
        try:
            self.ostudy = optuna.create_study(study_name=self.name, storage=storage, load_if_exists=True,
                                              direction=self.study.direction, sampler=sampler,
                                              pruner=make_pruner(self.study.pruner, self.epochs, self.study.pruner_args))
        except Exception as exc:
            raise StudyError(f"--storage {redact(self.storage_url)}: cannot create the study ({exc})") from None
        signature = {"recipe": self.recipe, "overrides": self.opts.overrides, "study_file": self.study.path.read_text()}
        saved = self.ostudy.user_attrs.get("signature")
        if saved is None:
            self.ostudy.set_user_attr("signature", signature)
            self.ostudy.set_user_attr("objective", self.study.objective)
            self.ostudy.set_metric_names([self.study.objective])  # named in optuna-dashboard
        elif saved["recipe"] != self.recipe or saved["overrides"] != self.opts.overrides:
            raise StudyError(f"study '{self.name}' in {redact(self.storage_url)} was started with --recipe "
                             f"{saved['recipe']} and --set {saved['overrides'] or '(none)'}; rerun with the same, "
                             f"or use another --storage to start a separate study.")
        self.executor = launch.make_executor(self.kind, self.dir / "jobs", self.resources, self.name,
                                             self.opts.parallel)
        self.executor.preflight()  # a refused account/QOS/partition, too few GPUs: one line, before any trial is asked
        self.code_dir = snapshot.take(self.dir / "code")  # what every job of this driver runs

    def lock(self):
        """One driver per study directory at a time; a second one says so and exits."""
        self._lock = open(self.dir / "driver.lock", "a+")
        try:
            runio.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except runio.LockUnsupported as exc:
            raise StudyError(str(exc.strerror)) from None
        except BlockingIOError:
            raise StudyError(f"another driver is already running study '{self.name}' "
                             f"(lock {self.dir / 'driver.lock'}); watch it with --status.") from None

    def open_and_run(self) -> None:
        """Take the study's lock, run its trials (driver rounds, or workers), release the lock."""
        self.open()
        try:
            self.run_workers() if self.opts.workers else self.run()
        finally:
            self.close()

    def close(self) -> None:
        """Release the driver lock now, not whenever the driver is garbage-collected: a process that
        runs studies one after another (a suite, a rerun in the same process) must not find its own
        finished driver still holding it."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.ostudy.get_trials(deepcopy=False)

    # -------------------------------------------------------------- shared runs
    def share_finished(self, trials) -> None:
        """Record every pending grid point that some study has already finished (same identity,
        same seed) from that run, instead of training it again (harness.shared)."""
        if self.study.sampler != "grid" or not self.opts.share:  # a search's points are chosen one by one
            return
        pending = self.plan.pending(trials)
        finished = self.runs.by_digest() if pending else {}  # one walk of the results tree a round
        for params in pending:
            self.share(params, finished)

    def share(self, params: dict, finished: dict[str, list[Path]]) -> bool:
        spec = make_spec(self.study, params, self.dir, self.opts.recipe, self.opts.overrides, self.gpus)
        if spec.run_dir.is_symlink():  # linked by a driver that stopped before recording the trial
            source = spec.run_dir.resolve()
        elif spec.run_dir.exists():  # this study's own run, perhaps partial: it goes on there
            return False
        else:
            source = self.runs.find(spec.config.digest(), besides=spec.run_dir.resolve(), runs=finished)
            if source is None:
                return False
        result = read_trial_result(source, self.study.objective, self.gpus)
        if result.outcome not in (Outcome.COMPLETED, Outcome.DIVERGED):  # e.g. finished without this objective
            return False
        if not spec.run_dir.is_symlink():
            shared.link(spec.run_dir, source)
        origin = os.path.relpath(source, runio.RESULTS.resolve())
        # Its training time was spent by the study that ran it: not counted again here.
        attrs = {**spec.attrs, **result.attrs, **failure_attrs(result.outcome, result.reason), "executor": "shared",
                 "shared_from": origin, "shared_hours": result.attrs.get("hours", 0.0), "hours": 0.0, "gpu_hours": 0.0}
        distributions = {key: optuna.distributions.CategoricalDistribution(levels)
                         for key, levels in self.study.factors.items()}
        distributions["seed"] = optuna.distributions.CategoricalDistribution(self.study.seeds)
        done = result.outcome is Outcome.COMPLETED
        self.ostudy.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, value=result.value if done else None,
            state=optuna.trial.TrialState.COMPLETE if done else FAIL,
            user_attrs={k: v for k, v in attrs.items() if v is not None}))
        print(f"[study {self.name}] {spec.key}: shared: {origin} finished the same run (identity "
              f"{spec.config.digest()}); not trained again.", flush=True)
        return True

    # -------------------------------------------------------------- submit
    def submit(self, todo: list[dict | None]) -> int:
        """Create one trial per entry and launch its jobs (a job array on SLURM)."""
        pruner = (self.study.pruner, self.epochs, self.study.pruner_args) if self.study.pruner != "none" else None
        threads = self.executor.threads_per_process(self.opts.parallel)
        prepared = []
        for params in todo:
            trial, params = self.plan.ask(self.ostudy, params)
            try:
                spec = make_spec(self.study, params, self.dir, self.opts.recipe, self.opts.overrides, self.gpus)
            except ConfigError as exc:  # a sampled point the recipe cannot run (search spaces)
                tell_failure(self.ostudy, trial, Outcome.INVALID, str(exc))
                continue
            for name, value in {**spec.attrs, "executor": self.kind, "submitted": time.time(),
                                "code": self.code_dir.name}.items():
                trial.set_user_attr(name, value)
            # A driver that waits relays pruning: its jobs never open the storage (harness.pruning_relay).
            relay = max(RELAY_WAIT_S, RELAY_WAIT_POLLS * self.opts.poll) if self.opts.wait else None
            prepared.append((trial, launch.TrialJob(spec, None if relay else self.storage_url, self.name,
                                                    trial_id(trial), pruner, threads, relay_wait_s=relay)))
        if not prepared:
            return 0
        by_key = {job.spec.key: trial for trial, job in prepared}
        packs = launch.pack([job for _, job in prepared], self.resources.trials_per_job)
        jobs = self.executor.submit(packs, self.code_dir)
        for packed, job in zip(packs, jobs):
            for member in launch.members(packed):
                by_key[member.spec.key].set_user_attr("job_id", str(job.job_id))
        return len(prepared)

    def relay_pruning(self) -> None:
        """The pruner's decisions for the running trials' epoch reports (their jobs wait for them)."""
        if self.study.pruner == "none":
            return
        for t in self.trials():
            if t.state == RUNNING and "run_dir" in t.user_attrs and t.user_attrs.get("executor") != "worker":
                pruning_relay.relay(trial_handle(self.ostudy, trial_id(t)), self.dir / t.user_attrs["run_dir"])

    # -------------------------------------------------------------- reconcile
    def reconcile(self) -> None:
        """Tell Optuna the outcome of every RUNNING trial whose job has ended (or vanished)."""
        # Workers tell Optuna themselves (heartbeats cover the ones that die).
        running = [t for t in self.trials() if t.state == RUNNING and t.user_attrs.get("executor") != "worker"]
        if any("job_id" not in t.user_attrs for t in running):
            self._recover_job_ids(running)
        mine = {t.user_attrs["job_id"]: t.user_attrs.get("submitted", 0) for t in running
                if "job_id" in t.user_attrs and t.user_attrs.get("executor", self.kind) == self.kind}
        ended = self.executor.ended(mine)
        for t in running:
            job_id = t.user_attrs.get("job_id")
            if job_id is None:  # the driver died between ask() and recording the job it may have started
                set_running_attrs(self.ostudy, t, {"never_ran": True})  # no retry is spent on it
                tell_failure(self.ostudy, t, Outcome.FAILED, "lost: the driver stopped before recording a job; "
                             "the point is asked again (a job it did start is waited for by the new one)")
            elif t.user_attrs.get("executor", self.kind) != self.kind:
                tell_failure(self.ostudy, t, Outcome.FAILED, f"lost: submitted with the {t.user_attrs['executor']} "
                             f"executor, re-attached with {self.kind}")
            elif job_id in ended:
                self.finalize(t, ended[job_id])

    def _recover_job_ids(self, running) -> None:
        """A driver killed between submitting and recording job ids left trials without one; find
        their jobs in submitit's own records (each submitted pickle holds its TrialJob)."""
        import submitit

        by_trial = {}
        for path in (self.dir / "jobs").glob("*_submitted.pkl"):
            try:
                job = submitit.core.utils.pickle_load(path).function
            except Exception:  # a pickle being written, or not ours
                continue
            if isinstance(job, (launch.TrialJob, launch.PackedJob)):
                for member in launch.members(job):
                    by_trial[member.trial_id] = path.name[: -len("_submitted.pkl")]
        for t in running:
            if "job_id" not in t.user_attrs and trial_id(t) in by_trial:
                set_running_attrs(self.ostudy, t, {"job_id": by_trial[trial_id(t)]})
                t.user_attrs["job_id"] = by_trial[trial_id(t)]

    def finalize(self, t, state: str) -> None:
        result = read_trial_result(self.dir / t.user_attrs["run_dir"], self.study.objective, self.gpus)
        if result.outcome is Outcome.FAILED and result.reason is None:
            status = runio.read_status(self.dir / t.user_attrs["run_dir"])
            where = (f" (the run had reached epoch {status['epoch']}, step {status.get('global_step')})"
                     if status.get("epoch") is not None else " (before training started)")
            result.reason = self.executor.failure(t.user_attrs["job_id"], state, t.user_attrs.get("key")) + where
        tell(self.ostudy, t, result)

    # -------------------------------------------------------------- worker mode
    def run_workers(self) -> None:
        """Enqueue every pending grid point once, then let N workers pull them (see harness.worker)."""
        from .worker import WorkerJob

        view = ProgressView(self)
        for _ in range(self.study.retries + 1):
            self.share_finished(self.trials())
            for params in self.plan.pending(self.trials()):
                key = trial_key(params)
                self.ostudy.enqueue_trial(params, user_attrs={"key": key, "run_dir": f"runs/{key}"})
            if not any(t.state == WAITING for t in self.trials()):
                break
            job = WorkerJob(str(self.dir / STUDY_COPY), self.name, self.storage_url, self.opts.recipe,
                            self.opts.overrides, str(self.dir), self.executor.threads_per_process(self.opts.workers),
                            self.opts.heartbeat, self.gpus)
            jobs = self.executor.submit([job] * self.opts.workers, self.code_dir)
            if not self.opts.wait:
                print(f"{len(jobs)} workers submitted; --status to check ({self.dir})")
                return
            outage = Outage(self.storage_url, self.opts.outage_limit_s, self.opts.command)
            while True:
                outage.patiently(lambda: view.show(self.trials()))
                if all(j.done() for j in jobs):
                    break
                time.sleep(self.opts.poll)

    # -------------------------------------------------------------- main loop
    def run(self) -> None:
        """Rounds of reconcile and submit until the plan is done. A round cut by a database outage is
        simply done again once the database answers: every step of it can be repeated (a trial
        asked but not submitted waits; a job submitted but not recorded is found by its pickle)."""
        view = ProgressView(self)
        outage = Outage(self.storage_url, self.opts.outage_limit_s, self.opts.command)
        while True:
            finished = outage.patiently(lambda: self.round(view))
            if not self.opts.wait:
                print(f"submitted; rerun the same command to re-attach, or --status to check ({self.dir})")
                return
            if finished:
                break
            time.sleep(self.opts.poll)

    def round(self, view: "ProgressView") -> bool:
        """One look: answer pruning reports, record ended jobs, submit what the plan allows. True when
        nothing is left to do."""
        self.relay_pruning()
        self.reconcile()
        self.share_finished(self.trials())
        trials = self.trials()
        running = sum(t.state == RUNNING for t in trials)
        free = None if self.kind == "slurm" else max(0, self.opts.parallel - running)
        todo = self.plan.todo(trials, free)
        if todo:
            self.submit(todo)
        trials = self.trials()
        view.show(trials)
        return not any(t.state == RUNNING for t in trials) and self.plan.finished(trials)


# ---------------------------------------------------------------- progress and status

def _running_detail(study_dir: Path, t) -> str:
    if "run_dir" not in t.user_attrs:
        return "starting"
    records = runio.read_jsonl(study_dir / t.user_attrs["run_dir"] / "metrics.jsonl")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        return "starting"
    last = epochs[-1]
    knn = f" kNN {last['knn_top1']:.3f}" if last.get("knn_top1") is not None else ""
    return f"epoch {last['epoch']}{knn}"


class ProgressView:
    """A redrawn block on a terminal; otherwise one plain line whenever the counts change."""

    def __init__(self, driver: Driver):
        self.driver, self.tty = driver, sys.stdout.isatty()
        self.last, self.lines = None, 0

    def summary(self, trials) -> str:
        count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        trained = [t for t in done if "shared_from" not in t.user_attrs]  # shared ones took no time here
        best = ""
        if done:
            pick = max if self.driver.study.direction == "maximize" else min
            b = pick(done, key=lambda t: t.value)
            best = f" | best {b.value:.4f} ({b.user_attrs.get('key')})"
        total = self.driver.plan.total
        running = count(RUNNING)
        eta = ""
        if trained and running:  # mean trial duration x trials left / trials running at once
            per = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trained) / len(trained)
            remaining = max(total - len(done), 0)
            eta = f" | ETA ~{per * remaining / running / 60:.0f} min"
        return (f"[study {self.driver.name}] done {len(done)}/{total} running {running} "
                f"failed {count(FAIL)} pruned {count(optuna.trial.TrialState.PRUNED)}{best}{eta}")

    def show(self, trials) -> None:
        head = self.summary(trials)
        detail = [f"  {t.user_attrs.get('key')}: {_running_detail(self.driver.dir, t)}" for t in trials
                  if t.state == RUNNING]
        if self.tty:
            if self.lines:
                sys.stdout.write(f"\x1b[{self.lines}F\x1b[J")
            sys.stdout.write("\n".join([head, *detail]) + "\n")
            sys.stdout.flush()
            self.lines = 1 + len(detail)
        elif head != self.last:
            print(head, flush=True)
        self.last = head


def status_table(driver: Driver) -> str:
    rows = []
    for t in driver.trials():
        a = t.user_attrs
        value = f"{t.value:.4f}" if t.value is not None else "-"
        detail = _running_detail(driver.dir, t) if t.state == RUNNING else (a.get("failure_reason") or "")
        rows.append(f"{t.number:>4}  {str(a.get('key', '-')):<40} {t.state.name:<9} {value:>8}  "
                    f"job {a.get('job_id', '-'):<10} {detail}")
    header = f"{'#':>4}  {'trial':<40} {'state':<9} {'value':>8}  job"
    return "\n".join([header, *rows]) if rows else "(no trials yet)"


def print_status(driver: Driver) -> int:
    """Where the study stands, read-only: creates nothing, launches nothing."""
    url = driver.storage_url
    try:
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            raise KeyError(url)
        driver.ostudy = optuna.load_study(study_name=driver.name, storage=open_storage(url, heartbeat_s=None))
    except KeyError:
        print(f"study '{driver.name}' has not started ({redact(driver.storage_url)}).")
        return 0
    print(ProgressView(driver).summary(driver.trials()))
    print(status_table(driver))
    return 0


def spending_plan(spec, levels: int) -> list[str]:
    """The race's error rate, look by look (what `decide.spending` spends where)."""
    alpha = spec.comparison_alpha(levels)
    lines = [f"spending plan ({spec.spending}): error rate {1 - spec.confidence:.3g} over {max(levels - 1, 1)} "
             f"comparison(s) with the best, {alpha:.4g} each, spent over {spec.looks} look(s):"]
    lines += [f"  look at {n} seeds: spends {spent:.3g} of it; interval at {100 * (1 - level):.3f} % "
              f"(nominal level {level:.3g})" for n, spent, level in spec.plan(levels)]
    return lines


def dry_run(driver: Driver) -> str:
    s, res = driver.study, driver.resources
    lines = [f"study {driver.name}: {s.description}", f"recipe {driver.recipe}; storage {redact(driver.storage_url)}; "
             f"executor {driver.kind}; results {driver.dir}"]
    if s.race:
        levels = len(driver.points) // s.race.max
        n = levels * s.race.initial
        lines.append(f"adaptive seeds: {levels} levels x {s.race.initial} seeds = {n} trials at first; then one "
                     f"more seed for the undecided levels and the best, up to {s.race.max} seeds: at most "
                     f"{levels * s.race.max} trials (margin {s.race.margin}, confidence {s.race.confidence})")
        lines += spending_plan(s.race, levels)
    if s.sampler == "grid":
        lines.append(f"{len(driver.points)} trials (levels x seeds), objective {s.objective} ({s.direction}):")
        for params, cfg in driver.points:
            lines.append(f"  {trial_key(params):<50} epochs {cfg.optim.epochs}, batch {cfg.optim.batch_size}, "
                         f"K {cfg.moco.queue_size}, m {cfg.moco.momentum}, T {cfg.moco.temperature}, "
                         f"{cfg.moco.key_encoder}")
        n = len(driver.points)
        finished = driver.runs.by_digest() if driver.opts.share else {}
        shared_n = sum(driver.runs.find(cfg.digest(), besides=(driver.dir / "runs" / trial_key(params)).resolve(),
                                        runs=finished) is not None for params, cfg in driver.points)
        lines.append(f"{shared_n} of the {n} trials are finished runs of other studies (shared): {n - shared_n} to "
                     f"train")
        n -= shared_n
    else:
        n = s.n_trials
        lines.append(f"{n} trials chosen by TPE over {', '.join(s.factors)}; pruner {s.pruner}")
    with tempfile.TemporaryDirectory() as scratch:  # a dry run leaves nothing behind
        executor = launch.make_executor(driver.kind, Path(scratch), res, driver.name, driver.opts.parallel)
        lines.append(f"job parameters ({driver.kind}): {json.dumps(executor.parameters(), default=str)}")
        if driver.kind == "slurm":
            lines.append("job script (as sbatch gets it; the job array adds --array):")
            lines += [f"  {line}" for line in executor.sbatch_lines()]
        try:
            executor.preflight()
        except StudyError as exc:
            lines.append(f"note: a run would stop here: {exc}")
        _, sources = driver.study.resources_with_sources(driver.recipe)
        lines.append("resources from: " + "; ".join(f"{key} {getattr(res, key)!r} ({origin})"
                                                    for key, origin in sorted(sources.items())))
        threads = driver.points[0][1].runtime.threads or executor.threads_per_process(driver.opts.parallel)
    per_trial = res.gpus * res.nodes * res.time_min / 60
    first = f"the first round at most {len(driver.points) // s.race.max * s.race.initial * per_trial:.1f}; " \
        if s.race else ""
    lines.append(f"GPU-hours: {first}at most {n * per_trial:.1f} ({n} trials x {res.gpus * res.nodes} GPUs x "
                 f"{res.time_min} min limit){'; CPU-only trials' if res.gpus == 0 else ''}")
    first_cfg = driver.points[0][1] if driver.points else None
    if first_cfg is not None and first_cfg.data.dataset == "imagefolder" and res.gpus > 0:
        from .input_budget import loader_cores_line

        lines.append(loader_cores_line(first_cfg, res.gpus, res.cpus, runio.RESULTS / "bench"))
    if res.trials_per_job > 1:
        jobs = math.ceil(n / res.trials_per_job)
        lines.append(f"packing: {res.trials_per_job} trials a job, one process each with {threads} thread(s), "
                     f"sharing the job's {res.cpus} CPUs{f' and {res.gpus} GPU' if res.gpus else ''}: {jobs} jobs for "
                     f"{n} trials; GPU-hours at most {jobs * per_trial:.1f} instead of {n * per_trial:.1f} "
                     f"unpacked (saves {(n - jobs) * per_trial:.1f})")
    if driver.kind == "local" and driver.points:  # SLURM jobs run on other machines: no local measurement
        from .runtime import machine_description

        lines.append(estimate_line(runio.RESULTS, driver.points[0][1], machine_description(), threads, n,
                                   driver.opts.parallel, res.gpus * res.nodes))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(prog="python -m harness.study", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a study in studies/ (e.g. momentum_sweep), or a study file's path")
    parser.add_argument("--recipe", help="swap the study's base recipe (e.g. imagenet-r50-v1)")
    parser.add_argument("--executor", default="auto", choices=["auto", "slurm", "local", "debug"])
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in results/<study>/)")
    parser.add_argument("--parallel", type=int, default=2, help="trials running at once (array parallelism)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every trial (not a factor's key: its levels set it)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    parser.add_argument("--status", action="store_true", help="print the study's state, launch nothing")
    parser.add_argument("--no-wait", action="store_true", help="submit and return; rerun to re-attach")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="worker mode: N processes pull trials from the storage (grid studies)")
    parser.add_argument("--heartbeat", type=int, default=30, metavar="S",
                        help="worker heartbeat on PostgreSQL/MySQL; a trial silent for 4 beats is retried")
    parser.add_argument("--db-outage-limit", type=float, default=30.0, metavar="MIN",
                        help="minutes the driver waits out a database that does not answer (default 30)")
    parser.add_argument("--no-share", action="store_true",
                        help="train every point here, even ones another study has finished (same identity)")
    parser.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    opts = Options(recipe=args.recipe, executor=args.executor, storage=args.storage, parallel=args.parallel,
                   overrides=list(args.overrides), wait=not args.no_wait, report=not args.no_report,
                   workers=args.workers, heartbeat=args.heartbeat, poll=args.poll,
                   outage_limit_s=args.db_outage_limit * 60, share=not args.no_share,
                   command=" ".join(["python -m harness.study", *(shlex.quote(redact(a)) for a in argv)]))
    return args, opts


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        suite = suite_path(args.name)
        if suite is not None:
            return suite_main(suite, args, opts)
        driver = Driver(load_study(args.name), opts)
        if args.dry_run:
            print(dry_run(driver))
            return 0
        if args.status:
            return print_status(driver)
        driver.open_and_run()
    except (StudyError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if opts.wait and opts.report:
        out = build_report(driver.name, driver.storage_url)
        print(f"report: {out}")
        hints = (out / "hints.txt").read_text().strip() if (out / "hints.txt").exists() else ""
        if hints:  # an undecided fixed design says what would decide it
            print(hints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
