"""The driver of one study: it asks its plan which trials to run, submits their jobs, watches them
and records each result (`python -m harness.study NAME` runs it; harness/study.py is the face).

The driver is the only writer of final trial states. It reads each finished trial's run directory
(status.json, probe.json), so a driver killed and started again re-attaches to running jobs by id,
never reruns a completed trial, and retries lost or failed ones up to the study's `retries`.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import optuna

from harness.execution import executors, job_files, pruning_relay, tracking
from harness.execution.jobs import PackedJob, TrialJob, members, pack
from harness.execution.optuna_adapter import COMPLETE, FAIL, RUNNING, WAITING, set_running_attrs, trial_handle, trial_id
from harness.execution.plans import AdaptivePlan, GridPlan, SearchPlan
from harness.execution.status import ProgressView
from harness.execution.storage import Outage, default_url, open_storage, redact
from harness.execution.trial import TrialSpec, failure_attrs, make_spec, tell, tell_failure
from harness.planning import shared
from harness.planning.studyfile import STUDY_COPY, Study, load_study_file, make_pruner, trial_key, validate_levels
from harness.run import evaluations, runio, snapshot
from harness.run import trial_record as record
from harness.run.datafiles import check_dataset
from harness.run.errors import ConfigError, StudyError
from harness.run.outcome import Outcome
from harness.run.trial_result import TrialResult, read_trial_result

# How long a job waits for the driver's pruning decision after an epoch: the driver answers within a
# round (--poll seconds apart); a driver that does not answer costs one such wait (harness.execution.pruning_relay).
RELAY_WAIT_S, RELAY_WAIT_POLLS = 5.0, 10



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
    share: bool = True  # reuse runs other studies finished (harness.planning.shared); False: train every point here
    track: str | None = None  # an MLflow tracking URI the driver relays the runs to (else the study file's tracking.mlflow)


# ---------------------------------------------------------------- the driver

class Driver:
    """One study's driver: validates every point, opens the storage, submits trials, re-attaches to
    running jobs, shares finished runs, relays pruning and records each outcome in Optuna."""

    def __init__(self, study: Study, opts: Options):
        """Everything that can be refused is refused here, before anything is submitted.

        Args:
            study: the study file as load_study read it.
            opts: the command line's options (recipe, executor, storage, parallelism, overrides, ...).

        Raises:
            ConfigError: a level (or the `--set` overrides) the recipe cannot run.
            StudyError: an override of a factor's key, a missing dataset, a storage that cannot be
                opened or was started with another recipe, an executor or cluster that refuses the job
                (sbatch --test-only), or another driver already running this study.
        """
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
        self.kind = executors.resolve_executor(opts.executor)
        self.epochs = self.points[0][1].optim.epochs
        self.resources = self.study.resources_for(self.recipe)
        self.gpus = self.resources.gpus * self.resources.nodes
        self.eval_resources = self.resources.for_evaluation()  # resources.eval: evaluation as a job of its own
        self.eval_executor: executors.Executor | None = None
        self._to_evaluate: list = []  # a round's pretrained runs (and failed evaluations), submitted in packs
        if opts.workers and self.resources.trials_per_job > 1:
            raise StudyError(f"{self.study.path}: resources.trials_per_job: packing is for the driver's jobs; "
                             f"--workers already runs one trial per worker process (drop one of them).")
        ranks = (self.resources.tasks or max(self.resources.gpus, 1)) * self.resources.nodes
        if opts.workers and ranks > 1:
            raise StudyError(f"{self.study.path}: resources: a trial here is {ranks} DDP processes (gpus "
                             f"{self.resources.gpus}, tasks {self.resources.tasks}, nodes {self.resources.nodes}); "
                             f"--workers runs one process per trial. Drop --workers (the driver's jobs run DDP), "
                             f"or give each trial one GPU (--set is not enough: resources.gpus: 1 in the study).")
        if opts.workers and self.eval_resources is not None:
            raise StudyError(f"{self.study.path}: resources.eval: evaluation jobs are the driver's; --workers probes in "
                             "each worker (drop one of them).")
        if opts.workers and (self.study.sampler != "grid" or self.study.race):
            raise StudyError("--workers: worker mode runs a fixed grid; searches and adaptive seeds need the "
                             "driver's rounds (drop --workers).")
        if self.kind != "slurm" and self.resources.nodes > 1:
            raise StudyError(f"{self.study.path}: resources.nodes: {self.resources.nodes} nodes per trial need "
                             f"SLURM; the {self.kind} executor runs on this machine only. Use --executor slurm "
                             f"or set resources.nodes to 1.")
        self.tracking_uri = opts.track or self.study.tracking.get("mlflow")
        self.tracker: tracking.MlflowRelay | None = None
        self.runs = shared.RunIndex(runio.RESULTS)  # finished runs of every study: shared, not trained twice
        self.plan: GridPlan | SearchPlan
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
        saved = self.ostudy.user_attrs.get(record.SIGNATURE)
        if saved is None:
            self.ostudy.set_user_attr(record.SIGNATURE, signature)
            self.ostudy.set_user_attr(record.OBJECTIVE, self.study.objective)
            self.ostudy.set_metric_names([self.study.objective])  # named in optuna-dashboard
        elif saved["recipe"] != self.recipe or saved["overrides"] != self.opts.overrides:
            raise StudyError(f"study '{self.name}' in {redact(self.storage_url)} was started with --recipe "
                             f"{saved['recipe']} and --set {saved['overrides'] or '(none)'}; rerun with the same, "
                             f"or use another --storage to start a separate study.")
        self.executor = executors.make_executor(self.kind, self.dir / "jobs", self.resources, self.name,
                                             self.opts.parallel)
        self.executor.preflight()  # a refused account/QOS/partition, too few GPUs: one line, before any trial is asked
        if self.eval_resources is not None:
            self.eval_executor = executors.make_executor(self.kind, self.dir / "jobs-eval", self.eval_resources,
                                                         f"{self.name}-eval", self.opts.parallel)
            self.eval_executor.preflight()
        self.code_dir = snapshot.take(self.dir / "code")  # what every job of this driver runs
        if self.tracking_uri:  # the driver's own client: jobs get no tracking URI (harness.execution.tracking)
            self.tracker = tracking.MlflowRelay(self.tracking_uri, self.name, self.dir, list(self.study.factors),
                                                retry_s=min(tracking.RETRY_S, 10 * self.opts.poll))

    def lock(self):
        """One driver per study directory at a time; a second one says so and exits."""
        self._lock: TextIO | None = open(self.dir / "driver.lock", "a+")  # held until close()
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
        lock = getattr(self, "_lock", None)
        self._lock = None
        if lock is not None:
            lock.close()

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.ostudy.get_trials(deepcopy=False)

    # -------------------------------------------------------------- shared runs
    def share_finished(self, trials) -> None:
        """Record every pending grid point that some study has already finished (same identity,
        same seed) from that run, instead of training it again (harness.planning.shared)."""
        if not isinstance(self.plan, GridPlan) or not self.opts.share:  # a search's points are chosen one by one
            return
        pending = self.plan.pending(trials)
        finished = self.runs.by_digest() if pending else {}  # one walk of the results tree a round
        for params in pending:
            self.share(params, finished)

    def share(self, params: dict, finished: dict[str, list[Path]]) -> bool:
        spec = make_spec(self.study, params, self.dir, self.opts.recipe, self.opts.overrides, self.gpus)
        source: Path | None
        if spec.run_dir.is_symlink():  # linked by a driver that stopped before recording the trial
            source = spec.run_dir.resolve()
        elif spec.run_dir.exists():  # this study's own run, perhaps partial: it goes on there
            return False
        else:
            source = self.runs.find(spec.config.digest(), besides=spec.run_dir.resolve(), runs=finished)
            if source is None:
                return False
        result = read_trial_result(source, self.study.objective, self.gpus, spec.probe)
        pretrained = runio.read_status(source).get("status") == Outcome.COMPLETED.value
        if result.outcome not in (Outcome.COMPLETED, Outcome.DIVERGED) and not pretrained:
            return False
        if not spec.run_dir.is_symlink():
            shared.link(spec.run_dir, source)
        origin = os.path.relpath(source, runio.RESULTS.resolve())
        if result.outcome is not Outcome.DIVERGED and spec.probe is not None and result.probe is None:
            # The pretraining is done, this probe is not (evaluation is not part of the identity): the trial's
            # job goes on from the run's last checkpoint, trains nothing, and only probes (or its evaluation job).
            print(f"[study {self.name}] {spec.key}: shares the pretraining of {origin} "
                  f"(identity {spec.config.digest()}); only its {spec.probe['protocol']} probe is run here.", flush=True)
            return False
        # Its training time was spent by the study that ran it: not counted again here.
        attrs = {**spec.attrs, **result.attrs, **failure_attrs(result.outcome, result.reason), record.EXECUTOR: record.SHARED,
                 record.SHARED_FROM: origin, record.SHARED_HOURS: result.attrs.get(record.HOURS, 0.0), record.HOURS: 0.0, record.GPU_HOURS: 0.0}
        distributions: dict[str, optuna.distributions.BaseDistribution] = {
            key: optuna.distributions.CategoricalDistribution(levels)
            for key, levels in self.study.factors.items()}
        distributions["seed"] = optuna.distributions.CategoricalDistribution(self.study.seeds)
        done = result.outcome is Outcome.COMPLETED
        self.ostudy.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, value=result.value if done else None,
            state=COMPLETE if done else FAIL,
            user_attrs={k: v for k, v in attrs.items() if v is not None}))
        print(f"[study {self.name}] {spec.key}: shared: {origin} finished the same run (identity "
              f"{spec.config.digest()}); not trained again.", flush=True)
        return True

    # -------------------------------------------------------------- submit
    def submit(self, todo: Sequence[dict | None]) -> int:
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
            for name, value in {**spec.attrs, record.EXECUTOR: self.kind, record.SUBMITTED: time.time(),
                                "code": self.code_dir.name}.items():
                trial.set_user_attr(name, value)
            # A driver that waits relays pruning: its jobs never open the storage (harness.execution.pruning_relay).
            relay = max(RELAY_WAIT_S, RELAY_WAIT_POLLS * self.opts.poll) if self.opts.wait else None
            prepared.append((trial, TrialJob(spec, None if relay else self.storage_url, self.name,
                                                    trial_id(trial), pruner, threads, relay_wait_s=relay,
                                                    probe=self.eval_resources is None)))
        if not prepared:
            return 0
        by_key = {job.spec.key: trial for trial, job in prepared}
        packs = pack([job for _, job in prepared], self.resources.trials_per_job)
        jobs = self.executor.submit(packs, self.code_dir)
        for packed, job in zip(packs, jobs):
            for member in members(packed):
                by_key[member.spec.key].set_user_attr(record.JOB_ID, str(job.job_id))
        return len(prepared)

    def relay_pruning(self) -> None:
        """The pruner's decisions for the running trials' epoch reports (their jobs wait for them)."""
        if self.study.pruner == "none":
            return
        for t in self.trials():
            if t.state == RUNNING and record.RUN_DIR in t.user_attrs and t.user_attrs.get(record.EXECUTOR) != "worker":
                pruning_relay.relay(trial_handle(self.ostudy, trial_id(t)), self.dir / t.user_attrs[record.RUN_DIR])

    # -------------------------------------------------------------- reconcile
    def reconcile(self) -> None:
        """Tell Optuna the outcome of every RUNNING trial whose job has ended (or vanished)."""
        # Workers tell Optuna themselves (heartbeats cover the ones that die).
        running = [t for t in self.trials() if t.state == RUNNING and t.user_attrs.get(record.EXECUTOR) != "worker"]
        evaluating = [t for t in running if record.EVAL_JOB_ID in t.user_attrs]
        self._to_evaluate = []
        if evaluating:
            self.reconcile_evaluations(evaluating)
        running = [t for t in running if record.EVAL_JOB_ID not in t.user_attrs]
        if any(record.JOB_ID not in t.user_attrs for t in running):
            self._recover_job_ids(running)
        mine = {t.user_attrs[record.JOB_ID]: t.user_attrs.get(record.SUBMITTED, 0) for t in running
                if record.JOB_ID in t.user_attrs and t.user_attrs.get(record.EXECUTOR, self.kind) == self.kind}
        ended = self.executor.ended(mine)
        for t in running:
            job_id = t.user_attrs.get(record.JOB_ID)
            if job_id is None:  # the driver died between ask() and recording the job it may have started
                set_running_attrs(self.ostudy, t, {record.NEVER_RAN: True})  # no retry is spent on it
                tell_failure(self.ostudy, t, Outcome.FAILED, "lost: the driver stopped before recording a job; "
                             "the point is asked again (a job it did start is waited for by the new one)")
            elif t.user_attrs.get(record.EXECUTOR, self.kind) != self.kind:
                tell_failure(self.ostudy, t, Outcome.FAILED, f"lost: submitted with the {t.user_attrs['executor']} "
                             f"executor, re-attached with {self.kind}")
            elif job_id in ended:
                self.finalize(t, ended[job_id])
        if self._to_evaluate:
            self.submit_evaluations(self._to_evaluate)

    def _recover_job_ids(self, running) -> None:
        """A driver killed between submitting and recording job ids left trials without one; find
        their jobs in submitit's own records (each submitted pickle holds its TrialJob)."""

        by_trial = {}
        for path in (self.dir / "jobs").glob("*_submitted.pkl"):
            try:
                job = job_files.load(path).function
            except Exception:  # a pickle being written, or not ours
                continue
            if isinstance(job, (TrialJob, PackedJob)):
                for member in members(job):
                    by_trial[member.trial_id] = path.name[: -len("_submitted.pkl")]
        for t in running:
            if record.JOB_ID not in t.user_attrs and trial_id(t) in by_trial:
                set_running_attrs(self.ostudy, t, {record.JOB_ID: by_trial[trial_id(t)]})
                t.user_attrs[record.JOB_ID] = by_trial[trial_id(t)]

    def finalize(self, t, state: str) -> None:
        if self.eval_executor is not None and self._awaits_evaluation(t):
            self._to_evaluate.append(t)  # the pretraining job has ended and freed its devices
            return
        result = self._read(t)
        if result.outcome is Outcome.FAILED and result.reason is None:
            status = runio.read_status(self.dir / t.user_attrs[record.RUN_DIR])
            where = (f" (the run had reached epoch {status['epoch']}, step {status.get('global_step')})"
                     if status.get("epoch") is not None else " (before training started)")
            result.reason = self.executor.failure(t.user_attrs[record.JOB_ID], state, t.user_attrs.get(record.KEY)) + where
        tell(self.ostudy, t, result)

    # -------------------------------------------------------------- evaluation jobs (resources.eval)
    def _spec(self, t) -> TrialSpec:
        return make_spec(self.study, t.params, self.dir, self.opts.recipe, self.opts.overrides, self.gpus)

    def _read(self, t) -> TrialResult:
        """The trial's result from its run directory: its probe is the one with the trial's settings. A
        trial that only probed a shared pretraining (its runs/<key> a link) counts the probe's hours, not
        the training it did not repeat (shared_from, shared_hours: as a shared trial's)."""
        run_dir = self.dir / t.user_attrs[record.RUN_DIR]
        result = read_trial_result(run_dir, self.study.objective, self.gpus, self._spec(t).probe)
        if run_dir.is_symlink() and record.HOURS in result.attrs:
            probe_h = (result.probe or {}).get("seconds", 0.0) / 3600
            result.attrs.update({record.SHARED_FROM: os.path.relpath(run_dir.resolve(), runio.RESULTS.resolve()),
                                 record.SHARED_HOURS: result.attrs[record.HOURS] - probe_h,
                                 record.HOURS: probe_h, record.GPU_HOURS: probe_h * self.gpus})
        return result

    def _awaits_evaluation(self, t) -> bool:
        """A completed pretraining without the trial's probe (its protocol and settings): its evaluation job is due."""
        run_dir = self.dir / t.user_attrs[record.RUN_DIR]
        probe = self._spec(t).probe
        return (runio.read_status(run_dir).get("status") == Outcome.COMPLETED.value and probe is not None
                and evaluations.find(run_dir, probe) is None)

    def submit_evaluations(self, trials: list) -> None:
        """Evaluation jobs for these pretrained runs: resources.eval.trials_per_job of them a job."""
        from harness.execution.jobs import EvalJob, pack_evaluations

        assert self.eval_executor is not None and self.eval_resources is not None
        threads = self.eval_executor.threads_per_process(self.opts.parallel)
        members = [EvalJob.of(self.dir / t.user_attrs[record.RUN_DIR], self._spec(t).config, threads) for t in trials]
        packs = pack_evaluations(members, self.eval_resources.trials_per_job)
        jobs = self.eval_executor.submit(packs, self.code_dir)
        size = self.eval_resources.trials_per_job
        for i, t in enumerate(trials):
            job = jobs[i // size]
            tries = int(t.user_attrs.get(record.EVAL_TRIES, 0)) + 1
            set_running_attrs(self.ostudy, t, {record.EVAL_JOB_ID: str(job.job_id), record.EVAL_SUBMITTED: time.time(),
                                               record.EVAL_TRIES: tries})
            print(f"[study {self.name}] {t.user_attrs.get(record.KEY)}: pretrained; evaluation job {job.job_id} "
                  f"submitted{f' (try {tries})' if tries > 1 else ''}", flush=True)

    def reconcile_evaluations(self, evaluating) -> None:
        """Record the trials whose evaluation job has ended; a failed one is tried again (up to the
        study's retries) without training again, then the trial fails with the reason, the run kept."""
        assert self.eval_executor is not None
        ended = self.eval_executor.ended({t.user_attrs[record.EVAL_JOB_ID]: t.user_attrs.get(record.EVAL_SUBMITTED, 0)
                                          for t in evaluating})
        for t in evaluating:
            job_id = t.user_attrs[record.EVAL_JOB_ID]
            if job_id not in ended:
                continue
            if not self._awaits_evaluation(t):  # the probe is written: the trial's result is whole
                tell(self.ostudy, t, self._read(t))
                continue
            run_dir = str((self.dir / t.user_attrs[record.RUN_DIR]).resolve())
            reason = self.eval_executor.failure(job_id, ended[job_id], run_dir)
            if int(t.user_attrs.get(record.EVAL_TRIES, 1)) <= self.study.retries:
                print(f"[study {self.name}] {t.user_attrs.get(record.KEY)}: evaluation failed ({reason}); "
                      "tried again, no training", flush=True)
                self._to_evaluate.append(t)
            else:
                tell_failure(self.ostudy, t, Outcome.FAILED,
                             f"evaluation failed after {t.user_attrs.get(record.EVAL_TRIES)} tries ({reason}); the "
                             f"pretraining is complete: `python -m harness.study {self.study.name} --evaluate "
                             f"{self._spec(t).config.eval.probe}` evaluates it again")

    # -------------------------------------------------------------- worker mode
    def run_workers(self) -> None:
        """Enqueue every pending grid point once, then let N workers pull them (see harness.execution.worker)."""
        from harness.execution.worker import WorkerJob

        view = ProgressView.of(self)
        assert isinstance(self.plan, GridPlan), "worker mode runs grid studies (checked by the face)"
        for _ in range(self.study.retries + 1):
            self.share_finished(self.trials())
            for params in self.plan.pending(self.trials()):
                key = trial_key(params)
                self.ostudy.enqueue_trial(params, user_attrs={record.KEY: key, record.RUN_DIR: f"runs/{key}"})
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

    # -------------------------------------------------------------- re-evaluation
    @staticmethod
    def _final_epoch(job) -> int:
        return int(runio.read_status(Path(job.run_dir)).get("epoch", -1))

    def evaluate(self, protocol: str, epoch: int | None = None) -> tuple[int, list[str]]:
        """Add an evaluation protocol to the study's finished runs: a job per run that lacks it, which
        probes its last checkpoint (or the one kept at `epoch`: runtime.keep_epochs) and never trains
        (harness.execution.jobs.EvalJob); a failed one is tried again up to the study's `retries`.
        Returns (results written, what failed).

        Raises:
            StudyError: `epoch` not kept by a run that lacks the probe (before anything is submitted).
        """
        from harness.execution.jobs import EvalJob, pack_evaluations

        def pending() -> dict[str, EvalJob]:
            """The study's finished runs without this protocol under the study's settings for it."""
            todo = {}
            for t in self.trials():
                if t.state != COMPLETE or record.RUN_DIR not in t.user_attrs:
                    continue
                run_dir = (self.dir / t.user_attrs[record.RUN_DIR]).resolve()  # a shared run: its own directory
                cfg = self._spec(t).config
                if evaluations.find(run_dir, evaluations.of(cfg, protocol, epoch) or {}) is None:
                    todo[t.user_attrs[record.KEY]] = EvalJob.of(run_dir, cfg, threads, protocol, epoch)
            return todo

        # With resources.eval: its executor and its packing (evaluations a job); else the trial's, one a job.
        executor = self.eval_executor or self.executor
        size = self.eval_resources.trials_per_job if self.eval_resources is not None else 1
        threads = executor.threads_per_process(self.opts.parallel)
        if epoch is not None:
            unkept = [key for key, job in pending().items() if epoch != self._final_epoch(job)
                      and not runio.kept_checkpoint(Path(job.run_dir) / "checkpoints", epoch).exists()]
            if unkept:
                raise StudyError(f"--epoch {epoch}: {len(unkept)} run(s) kept no checkpoint of that epoch "
                                 f"(first: {unkept[0]}); runtime.keep_epochs lists the epochs a run keeps, set before "
                                 f"it trains (a runtime setting: it never changes what a run computes).")
        done, failed = 0, dict[str, str]()
        for attempt in range(self.study.retries + 1):
            todo = pending()
            if not todo:
                break
            print(f"[study {self.name}] {protocol} evaluation of {len(todo)} finished run(s)"
                  f"{f' (try {attempt + 1})' if attempt else ''}: no training", flush=True)
            members = list(todo.values())
            jobs = executor.submit(pack_evaluations(members, size), self.code_dir)
            while not all(job.done() for job in jobs):
                time.sleep(self.opts.poll)
            missing = pending()  # what the run directories still lack, whatever the jobs returned
            done += len(todo) - len(missing)
            # why: the job's exception, or a pack's reason for that run (harness.execution.jobs.EvalJobs)
            failed = {key: executor.failure(str(jobs[i // size].job_id), jobs[i // size].state, member.run_dir)
                      for i, (key, member) in enumerate(zip(todo, members)) if key in missing}
        return done, [f"{key}: {reason}" for key, reason in failed.items()]

    # -------------------------------------------------------------- main loop
    def run(self) -> None:
        """Rounds of reconcile and submit until the plan is done. A round cut by a database outage is
        simply done again once the database answers: every step of it can be repeated (a trial
        asked but not submitted waits; a job submitted but not recorded is found by its pickle)."""
        view = ProgressView.of(self)
        outage = Outage(self.storage_url, self.opts.outage_limit_s, self.opts.command)
        while True:
            finished = outage.patiently(lambda: self.round(view))
            if not self.opts.wait:
                print(f"submitted; rerun the same command to re-attach, or --status to check ({self.dir})")
                return
            if finished:
                break
            time.sleep(self.opts.poll)
        if self.tracker is not None and self.tracker.relay(self.trials(), now=True) is None:
            self.tracker.missed(f"python -m harness.report {self.name} --track {redact(self.tracking_uri or '')}")

    def round(self, view: ProgressView) -> bool:
        """One look: answer pruning reports, record ended jobs, submit what the plan allows. True when
        nothing is left to do."""
        self.relay_pruning()
        self.reconcile()
        self.share_finished(self.trials())
        trials = self.trials()
        if self.tracker is not None:  # never raises: a tracking server down costs a warning, not a round
            self.tracker.relay(trials)
        running = sum(t.state == RUNNING for t in trials)
        free = None if self.kind == "slurm" else max(0, self.opts.parallel - running)
        news = self.plan.news(trials)
        if news:  # said once per change, as the race goes
            print(f"[study {self.name}] {news}", flush=True)
        todo = self.plan.todo(trials, free)
        if todo:
            self.submit(todo)
        trials = self.trials()
        view.show(trials)
        return not any(t.state == RUNNING for t in trials) and self.plan.finished(trials)


