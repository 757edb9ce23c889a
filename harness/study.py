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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from . import launch, runio, snapshot
from .config import ConfigError
from .data import check_dataset
from .storage import default_url, open_storage, redact
from .studyfile import Study, StudyError, load_study, make_pruner, trial_key, validate_levels
from .trial_result import read_trial_result

FINAL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING = optuna.trial.TrialState.RUNNING
WAITING = optuna.trial.TrialState.WAITING
FAIL = optuna.trial.TrialState.FAIL


class Driver:
    def __init__(self, study: Study, args: argparse.Namespace):
        self.study, self.args = study, args
        self.recipe = args.recipe or study.recipe
        self.extra = list(args.overrides)
        suffix = "" if self.recipe == study.recipe else f"@{self.recipe}"
        self.name = study.name + suffix
        self.dir = (runio.RESULTS / self.name).resolve()
        self.points, self.notes = validate_levels(study, args.recipe, self.extra)  # impossible levels fail here
        for note in self.notes:
            print(f"note: {note}", file=sys.stderr)
        check_dataset(self.points[0][1])
        self.storage_url = args.storage or default_url(self.dir)
        self.kind = launch.resolve_executor(args.executor)
        self.parallel = max(1, args.parallel)
        self.epochs = self.points[0][1].optim.epochs
        self.resources = study.resources_for(self.recipe)

    # -------------------------------------------------------------- setup
    def open(self) -> None:
        runio.check_writable(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock()
        storage = open_storage(self.storage_url, self.args.heartbeat, self.study.retries)
        sampler = (optuna.samplers.TPESampler(seed=0, constant_liar=True) if self.study.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=0))  # grid points are enqueued, never sampled
        try:
            self.ostudy = optuna.create_study(study_name=self.name, storage=storage, load_if_exists=True,
                                              direction=self.study.direction, sampler=sampler,
                                              pruner=make_pruner(self.study.pruner, self.epochs, self.study.pruner_args))
        except Exception as exc:
            raise StudyError(f"--storage {redact(self.storage_url)}: cannot create the study ({exc})") from None
        signature = {"recipe": self.recipe, "overrides": self.extra, "study_file": self.study.path.read_text()}
        saved = self.ostudy.user_attrs.get("signature")
        if saved is None:
            self.ostudy.set_user_attr("signature", signature)
            self.ostudy.set_user_attr("objective", self.study.objective)
        elif saved["recipe"] != self.recipe or saved["overrides"] != self.extra:
            raise StudyError(f"study '{self.name}' in {redact(self.storage_url)} was started with --recipe "
                             f"{saved['recipe']} and --set {saved['overrides'] or '(none)'}; rerun with the same, "
                             f"or use another --storage to start a separate study.")
        self.executor = launch.make_executor(self.kind, self.dir / "jobs", self.resources, self.name,
                                             self.parallel)
        self.code_dir = snapshot.take(self.dir / "code")  # what every job of this driver runs

    def lock(self):
        """One driver per study directory at a time; a second one says so and exits."""
        self._lock = open(self.dir / "driver.lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another driver is already running study '{self.name}' "
                             f"(lock {self.dir / 'driver.lock'}); watch it with --status.") from None

    def snapshot_of(self, path: Path) -> Path:
        """A study file of studies/ as copied into the code snapshot (one given by path stays as is)."""
        try:
            return self.code_dir / path.resolve().relative_to(snapshot.CODE_ROOT)
        except ValueError:
            return path

    # -------------------------------------------------------------- bookkeeping
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.ostudy.get_trials(deepcopy=False)

    def by_key(self) -> dict[str, list[optuna.trial.FrozenTrial]]:
        out: dict[str, list] = {}
        for t in self.trials():
            out.setdefault(t.user_attrs.get("key", f"#{t.number}"), []).append(t)
        return out

    def run_dir(self, key: str) -> Path:
        return self.dir / "runs" / key

    def pending_grid(self) -> list[dict]:
        """Grid points that still need a job: never tried, or failed with retries left."""
        grouped, todo = self.by_key(), []
        for params, _ in self.points:
            tries = grouped.get(trial_key(params), [])
            if any(t.state in FINAL or t.state in (RUNNING, WAITING) for t in tries):
                continue
            if any(t.user_attrs.get("outcome") == "diverged" for t in tries):
                continue  # a result ("fail" in the paper), not an accident: never retried
            failures = sum(t.state == FAIL for t in tries)
            if failures <= self.study.retries:
                todo.append(params)
        return todo

    # -------------------------------------------------------------- submit
    def _new_trial(self, params: dict | None) -> tuple[optuna.trial.Trial, dict]:
        if params is not None:  # grid: fixed parameters ({} = a trial already waiting in the storage)
            if params:
                self.ostudy.enqueue_trial(params)
            trial = self.ostudy.ask()  # pops the oldest waiting trial
            fixed = {key: trial.suggest_categorical(key, levels) for key, levels in self.study.factors.items()}
            fixed["seed"] = trial.suggest_categorical("seed", self.study.seeds)
            return trial, fixed
        trial = self.ostudy.ask()  # search: the sampler chooses
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

    def _threads_per_process(self, concurrent: int) -> int:
        """CPU threads for each training process: its share of the job's CPUs (SLURM), or of this
        machine's cores when `concurrent` jobs share it (local)."""
        tasks = self.resources.tasks or max(self.resources.gpus, 1)
        if self.kind == "slurm":
            return max(1, self.resources.cpus // tasks)
        return max(1, (os.cpu_count() or 1) // (concurrent * tasks))

    def _launch(self, callables: list) -> list:
        """Submit from the code snapshot; on SLURM as one job array."""
        with snapshot.jobs_use(self.code_dir):
            if self.kind != "slurm":
                return [self.executor.submit(fn) for fn in callables]
            with self.executor.batch():
                return [self.executor.submit(fn) for fn in callables]

    def submit(self, todo: list[dict | None]) -> int:
        """Create one trial per entry and launch its jobs (a job array on SLURM)."""
        prepared = []
        for params in todo:
            trial, params = self._new_trial(params)
            key = trial_key(params)
            try:
                cfg = self.study.run_config(params, self.args.recipe, self.extra, run_name=f"{self.name}/{key}")
            except ConfigError as exc:  # a sampled point the recipe cannot run (search spaces)
                trial.set_user_attr("failure_reason", str(exc))
                trial.set_user_attr("outcome", "invalid")
                self.ostudy.tell(trial, state=FAIL)
                continue
            for name, value in {"key": key, "run_dir": str(self.run_dir(key)), "executor": self.kind,
                                "seed": params["seed"], "submitted": time.time(),
                                "code": self.code_dir.name}.items():
                trial.set_user_attr(name, value)
            threads = self._threads_per_process(self.parallel)
            pruner = (self.study.pruner, self.epochs, self.study.pruner_args) if self.study.pruner != "none" else None
            job = launch.TrialJob(str(self.run_dir(key)), cfg.to_dict(), self.storage_url, self.name,
                                  trial._trial_id, pruner, threads)
            prepared.append((trial, job))
        if not prepared:
            return 0
        jobs = self._launch([job for _, job in prepared])
        for (trial, _), job in zip(prepared, jobs):
            trial.set_user_attr("job_id", str(job.job_id))
            if self.kind == "debug":
                try:
                    job.result()
                except Exception:  # recorded by finalize from the run directory and the job
                    pass
                self.finalize(self.ostudy.get_trials(deepcopy=False)[trial.number], "FINISHED", job)
        return len(prepared)

    # -------------------------------------------------------------- reconcile
    def reconcile(self) -> None:
        """Tell Optuna the outcome of every RUNNING trial whose job has ended (or vanished)."""
        # Workers tell Optuna themselves (heartbeats cover the ones that die).
        running = [t for t in self.trials() if t.state == RUNNING and t.user_attrs.get("executor") != "worker"]
        if any("job_id" not in t.user_attrs for t in running):
            self._recover_job_ids(running)
        states = {}
        if self.kind == "slurm":
            states = launch.slurm_states([t.user_attrs["job_id"] for t in running if "job_id" in t.user_attrs])
        for t in running:
            job_id = t.user_attrs.get("job_id")
            if job_id is None:  # the driver died between ask() and submit
                self._tell_fail(t, "lost: the driver stopped before the job was submitted")
                continue
            kind = t.user_attrs.get("executor", self.kind)
            if kind == "slurm":
                state = states.get(job_id, "UNKNOWN")
                # sacct may lag a fresh submission; a job unknown for 5 minutes has vanished
                if state in launch.ALIVE or (state == "UNKNOWN" and time.time() - t.user_attrs["submitted"] < 300):
                    continue
            elif kind == "local":
                if launch.local_alive(job_id):
                    continue
                state = "FINISHED"
            else:
                state = "LOST"
            self.finalize(t, state)

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
            if isinstance(job, launch.TrialJob):
                by_trial[job.trial_id] = path.name[: -len("_submitted.pkl")]
        for t in running:
            if "job_id" not in t.user_attrs and t._trial_id in by_trial:
                self._set_attrs(t, {"job_id": by_trial[t._trial_id]})
                t.user_attrs["job_id"] = by_trial[t._trial_id]

    def _set_attrs(self, t, attrs: dict) -> None:
        """User attributes of a trial still RUNNING (Optuna freezes them once told)."""
        for name, value in attrs.items():
            if value is not None:
                self.ostudy._storage.set_trial_user_attr(t._trial_id, name, value)

    def _tell_fail(self, t, reason: str, outcome: str = "error") -> None:
        self._set_attrs(t, {"failure_reason": reason, "outcome": outcome})
        self.ostudy.tell(t.number, state=FAIL)

    def finalize(self, t, state: str, job=None) -> None:
        result = read_trial_result(Path(t.user_attrs["run_dir"]), self.study.objective,
                                   self.resources.gpus * self.resources.nodes)
        self._set_attrs(t, result.attrs)
        if result.outcome == "completed":
            self.ostudy.tell(t.number, result.value)
        elif result.outcome == "pruned":
            self.ostudy.tell(t.number, state=optuna.trial.TrialState.PRUNED)
        elif result.outcome == "diverged":
            self._tell_fail(t, result.reason, "diverged")
        else:
            reason = result.reason or (launch.job_failure(self.kind, self.dir / "jobs", t.user_attrs["job_id"], state)
                                       if self.kind != "debug" else _debug_reason(job))
            self._tell_fail(t, reason)

    # -------------------------------------------------------------- worker mode
    def run_workers(self, wait: bool = True) -> None:
        """Enqueue every pending grid point once, then let N workers pull them (see harness.worker)."""
        from .worker import WorkerJob

        if self.study.sampler != "grid":
            raise StudyError("--workers: worker mode runs grid studies; searches use the default driver.")
        view = ProgressView(self)
        for _ in range(self.study.retries + 1):
            for params in self.pending_grid():
                key = trial_key(params)
                self.ostudy.enqueue_trial(params, user_attrs={"key": key, "run_dir": str(self.run_dir(key))})
            if not any(t.state == WAITING for t in self.trials()):
                break
            threads = self._threads_per_process(self.args.workers)
            job = WorkerJob(str(self.snapshot_of(self.study.path)), self.name, self.storage_url, self.args.recipe,
                            self.extra, str(self.dir), threads, self.args.heartbeat,
                            self.resources.gpus * self.resources.nodes)
            jobs = self._launch([job] * self.args.workers)
            if self.kind == "debug":
                for j in jobs:
                    j.result()
            if not wait:
                print(f"{len(jobs)} workers submitted; --status to check ({self.dir})")
                return
            while not all(j.done() for j in jobs):
                view.show(self.trials())
                time.sleep(self.args.poll)
            view.show(self.trials())

    # -------------------------------------------------------------- main loop
    def run(self, wait: bool = True) -> None:
        view = ProgressView(self)
        search_budget = lambda: self.study.n_trials - sum(  # noqa: E731
            t.state != FAIL or t.user_attrs.get("outcome") == "diverged" for t in self.trials())
        while True:
            self.reconcile()
            running = sum(t.state == RUNNING for t in self.trials())
            if self.study.sampler == "grid":
                # Trials left WAITING (e.g. by a worker-mode run) go first, then new grid points.
                waiting = sum(t.state == WAITING for t in self.trials())
                todo = [{}] * waiting + self.pending_grid()
                if self.kind != "slurm":
                    todo = todo[:max(0, self.parallel - running)]
                if todo:
                    self.submit(todo)
            else:
                retries_left = sum(t.state == FAIL for t in self.trials()) <= self.study.retries * self.study.n_trials
                free = max(0, min(self.parallel - running, search_budget()))
                if free and retries_left:
                    self.submit([None] * free)
            trials = self.trials()
            view.show(trials)
            if not wait:
                print(f"submitted; rerun the same command to re-attach, or --status to check ({self.dir})")
                return
            if not any(t.state == RUNNING for t in trials):
                if self.study.sampler == "grid" and not self.pending_grid() \
                        and not any(t.state == WAITING for t in trials):
                    break
                if self.study.sampler == "tpe" and (search_budget() <= 0 or not retries_left):
                    break
            time.sleep(self.args.poll)


def _debug_reason(job) -> str:
    try:
        exc = job.exception() if job is not None else None
    except Exception as err:  # noqa: BLE001
        exc = err
    return f"{type(exc).__name__}: {exc}"[:500] if exc else "the job ended without a final status"


# ---------------------------------------------------------------- progress and status

def _running_detail(t) -> str:
    records = runio.read_jsonl(Path(t.user_attrs.get("run_dir", "/nonexistent")) / "metrics.jsonl")
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
        best = ""
        if done:
            pick = max if self.driver.study.direction == "maximize" else min
            b = pick(done, key=lambda t: t.value)
            best = f" | best {b.value:.4f} ({b.user_attrs.get('key')})"
        total = len(self.driver.points) if self.driver.study.sampler == "grid" else self.driver.study.n_trials
        running = count(RUNNING)
        eta = ""
        if done and running:  # mean trial duration x trials left / trials running at once
            per = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / len(done)
            remaining = max(total - len(done), 0)
            eta = f" | ETA ~{per * remaining / running / 60:.0f} min"
        return (f"[study {self.driver.name}] done {len(done)}/{total} running {running} "
                f"failed {count(FAIL)} pruned {count(optuna.trial.TrialState.PRUNED)}{best}{eta}")

    def show(self, trials) -> None:
        head = self.summary(trials)
        detail = [f"  {t.user_attrs.get('key')}: {_running_detail(t)}" for t in trials if t.state == RUNNING]
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
        detail = _running_detail(t) if t.state == RUNNING else (a.get("failure_reason") or "")
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
        driver.ostudy = optuna.load_study(study_name=driver.name, storage=open_storage(url))
    except KeyError:
        print(f"study '{driver.name}' has not started ({redact(driver.storage_url)}).")
        return 0
    print(ProgressView(driver).summary(driver.trials()))
    print(status_table(driver))
    return 0


def dry_run(driver: Driver) -> str:
    s, res = driver.study, driver.resources
    lines = [f"study {driver.name}: {s.description}", f"recipe {driver.recipe}; storage {redact(driver.storage_url)}; "
             f"executor {driver.kind}; results {driver.dir}"]
    if s.sampler == "grid":
        lines.append(f"{len(driver.points)} trials (levels x seeds), objective {s.objective} ({s.direction}):")
        for params, cfg in driver.points:
            lines.append(f"  {trial_key(params):<50} epochs {cfg.optim.epochs}, batch {cfg.optim.batch_size}, "
                         f"K {cfg.moco.queue_size}, m {cfg.moco.momentum}, T {cfg.moco.temperature}, "
                         f"{cfg.moco.key_encoder}")
        n = len(driver.points)
    else:
        n = s.n_trials
        lines.append(f"{n} trials chosen by TPE over {', '.join(s.factors)}; pruner {s.pruner}")
    with tempfile.TemporaryDirectory() as scratch:  # a dry run leaves nothing behind
        executor = launch.make_executor(driver.kind, Path(scratch), res, driver.name, driver.parallel)
        lines.append(f"job parameters ({driver.kind}): {json.dumps(launch.sbatch_parameters(executor), default=str)}")
    gpu_hours = n * res.gpus * res.nodes * res.time_min / 60
    lines.append(f"GPU-hours: at most {gpu_hours:.1f} ({n} trials x {res.gpus * res.nodes} GPUs x "
                 f"{res.time_min} min limit){'; CPU-only trials' if res.gpus == 0 else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.study", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a study in studies/ (e.g. momentum_sweep), or a study file's path")
    parser.add_argument("--recipe", help="swap the study's base recipe (e.g. imagenet-r50-v1)")
    parser.add_argument("--executor", default="auto", choices=["auto", "slurm", "local", "debug"])
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in results/<study>/)")
    parser.add_argument("--parallel", type=int, default=2, help="trials running at once (array parallelism)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    parser.add_argument("--status", action="store_true", help="print the study's state, launch nothing")
    parser.add_argument("--no-wait", action="store_true", help="submit and return; rerun to re-attach")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="worker mode: N processes pull trials from the storage (grid studies)")
    parser.add_argument("--heartbeat", type=int, default=30, metavar="S",
                        help="worker heartbeat on PostgreSQL/MySQL; a trial silent for 4 beats is retried")
    parser.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        driver = Driver(load_study(args.name), args)
        if args.dry_run:
            print(dry_run(driver))
            return 0
        if args.status:
            return print_status(driver)
        driver.open()
        if args.workers:
            driver.run_workers(wait=not args.no_wait)
        else:
            driver.run(wait=not args.no_wait)
    except (StudyError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_wait and not args.no_report:
        try:
            from .report import build_report
        except ImportError:
            return 0
        print(f"report: {build_report(driver.name, driver.storage_url)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
