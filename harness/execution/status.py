"""What a person reads about a study: the progress line, the status table and the dry run's plan.
Text only: the driver and the face print it."""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from harness.execution import executors
from harness.execution.optuna_adapter import COMPLETE, FAIL, PRUNED, RUNNING
from harness.execution.storage import open_storage, redact
from harness.planning.estimate import estimate_line
from harness.planning.studyfile import trial_key
from harness.run import evaluations, runio
from harness.run import trial_record as record
from harness.run.errors import StudyError

if TYPE_CHECKING:  # a back-reference for the annotations only: the driver imports this module
    from harness.execution.driver import Driver



def _running_detail(study_dir: Path, t) -> str:
    if record.RUN_DIR not in t.user_attrs:
        return "starting"
    if record.EVAL_JOB_ID in t.user_attrs:
        return f"pretrained; evaluating (job {t.user_attrs[record.EVAL_JOB_ID]})"
    records = runio.read_jsonl(study_dir / t.user_attrs[record.RUN_DIR] / "metrics.jsonl")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        return "starting"
    last = epochs[-1]
    knn = f" kNN {last['knn_top1']:.3f}" if last.get("knn_top1") is not None else ""
    return f"epoch {last['epoch']}{knn}"


class ProgressView:
    """A redrawn block on a terminal; otherwise one plain line whenever the counts change."""

    def __init__(self, name: str, direction: str, plan, study_dir: Path):
        """`plan`: the driver's (its `total` may grow as a race adds seeds)."""
        self.name, self.direction, self.plan, self.study_dir = name, direction, plan, study_dir
        self.tty, self.lines = sys.stdout.isatty(), 0
        self.last: str | None = None

    @classmethod
    def of(cls, driver: Driver) -> ProgressView:
        return cls(driver.name, driver.study.direction, driver.plan, driver.dir)

    def summary(self, trials) -> str:
        count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
        done = [t for t in trials if t.state == COMPLETE]
        trained = [t for t in done if record.SHARED_FROM not in t.user_attrs]  # shared ones took no time here
        best = ""
        if done:
            pick = max if self.direction == "maximize" else min
            b = pick(done, key=lambda t: t.value)
            best = f" | best {b.value:.4f} ({b.user_attrs.get('key')})"
        total = self.plan.total
        running = count(RUNNING)
        eta = ""
        if trained and running:  # mean trial duration x trials left / trials running at once
            per = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trained) / len(trained)
            remaining = max(total - len(done), 0)
            eta = f" | ETA ~{per * remaining / running / 60:.0f} min"
        return (f"[study {self.name}] done {len(done)}/{total} running {running} "
                f"failed {count(FAIL)} pruned {count(PRUNED)}{best}{eta}")

    def show(self, trials) -> None:
        head = self.summary(trials)
        detail = [f"  {t.user_attrs.get('key')}: {_running_detail(self.study_dir, t)}" for t in trials
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
        detail = _running_detail(driver.dir, t) if t.state == RUNNING else (a.get(record.FAILURE_REASON) or "")
        rows.append(f"{t.number:>4}  {str(a.get('key', '-')):<40} {t.state.name:<9} {value:>8}  "
                    f"job {a.get('job_id', '-'):<10} {detail}")
    header = f"{'#':>4}  {'trial':<40} {'state':<9} {'value':>8}  job"
    return "\n".join([header, *rows]) if rows else "(no trials yet)"


def status_text(driver: Driver) -> str:
    """Where the study stands, read-only: creates nothing, launches nothing."""
    url = driver.storage_url
    try:
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            raise KeyError(url)
        driver.ostudy = optuna.load_study(study_name=driver.name, storage=open_storage(url, heartbeat_s=None))
    except KeyError:
        return f"study '{driver.name}' has not started ({redact(driver.storage_url)})."
    return f"{ProgressView.of(driver).summary(driver.trials())}\n{status_table(driver)}"


def spending_plan(spec, levels: int) -> list[str]:
    """The race's error rate, look by look (what `decide.spending` spends where)."""
    alpha = spec.comparison_alpha(levels)
    lines = [f"spending plan ({spec.spending}): error rate {1 - spec.confidence:.3g} over {max(levels - 1, 1)} "
             f"comparison(s) with the best, {alpha:.4g} each, spent over {spec.looks} look(s):"]
    lines += [f"  look at {n} seeds: spends {spent:.3g} of it; interval at {100 * (1 - level):.3f} % "
              f"(nominal level {level:.3g})" for n, spent, level in spec.plan(levels)]
    return lines


def dry_run(driver: Driver) -> str:
    """The plan as text: the trials, what the jobs ask of the cluster, the cost. Submits nothing.

    Raises:
        StudyError: only what opening the plan raises; a refusal by the cluster is a line of the text.
    """
    s = driver.study
    lines = [f"study {driver.name}: {s.description}", f"recipe {driver.recipe}; storage {redact(driver.storage_url)}; "
             f"executor {driver.kind}; results {driver.dir}"]
    if s.race:
        lines += _race_lines(s.race, len(driver.points) // s.race.max)
    if s.sampler == "grid":
        grid, n = _grid_lines(driver)
        lines += grid
    else:
        n = s.n_trials
        lines.append(f"{n} trials chosen by TPE over {', '.join(s.factors)}; pruner {s.pruner}")
    job, threads = _job_lines(driver)
    return "\n".join(lines + job + _cost_lines(driver, n, threads))


def _race_lines(race, levels: int) -> list[str]:
    n = levels * race.initial
    return [f"adaptive seeds: {levels} levels x {race.initial} seeds = {n} trials at first; then one "
            f"more seed for the undecided levels and the best, up to {race.max} seeds: at most "
            f"{levels * race.max} trials (margin {race.margin}, confidence {race.confidence})",
            *spending_plan(race, levels)]


def _grid_lines(driver: Driver) -> tuple[list[str], int]:
    """Each point of the grid, and how many are shared from other studies; the trials to train."""
    s = driver.study
    lines = [f"{len(driver.points)} trials (levels x seeds), objective {s.objective} ({s.direction}):"]
    for params, cfg in driver.points:
        lines.append(f"  {trial_key(params):<50} epochs {cfg.optim.epochs}, batch {cfg.optim.batch_size}, "
                     f"K {cfg.moco.queue_size}, m {cfg.moco.momentum}, T {cfg.moco.temperature}, "
                     f"{cfg.moco.key_encoder}")
    n = len(driver.points)
    finished = driver.runs.by_digest() if driver.opts.share else {}
    shared_n = probe_only = 0
    for params, cfg in driver.points:
        source = driver.runs.find(cfg.digest(), besides=(driver.dir / "runs" / trial_key(params)).resolve(), runs=finished)
        if source is not None:
            shared_n += 1
            probe = evaluations.of(cfg)  # evaluation is not part of the identity: this probe may not be there yet
            probe_only += probe is not None and evaluations.find(source, probe) is None
    lines.append(f"{shared_n} of the {n} trials are finished runs of other studies (shared): {n - shared_n} to "
                 f"train" + (f"; {probe_only} of the shared runs lack this study's probe, which runs without training"
                             if probe_only else ""))
    return lines, n - shared_n


def _job_lines(driver: Driver) -> tuple[list[str], int]:
    """What a job asks of the executor (the job script on Slurm), the preflight's word, where each
    resource came from; and the threads a trial's process gets."""
    res = driver.resources
    with tempfile.TemporaryDirectory() as scratch:  # a dry run leaves nothing behind
        executor = executors.make_executor(driver.kind, Path(scratch), res, driver.name, driver.opts.parallel)
        lines = [f"job parameters ({driver.kind}): {json.dumps(executor.parameters(), default=str)}"]
        if isinstance(executor, executors.SlurmExecutor):
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
    return lines, threads


def _cost_lines(driver: Driver, n: int, threads: int) -> list[str]:
    """GPU-hours at most, the input pipeline's cores, packing's saving, the time estimate."""
    s, res = driver.study, driver.resources
    per_trial = res.gpus * res.nodes * res.time_min / 60
    first = f"the first round at most {len(driver.points) // s.race.max * s.race.initial * per_trial:.1f}; " \
        if s.race else ""
    evaluation = driver.eval_resources
    lines = [f"GPU-hours: {first}at most {n * per_trial:.1f} ({n} trials x {res.gpus * res.nodes} GPUs x "
             f"{res.time_min} min limit){'; CPU-only trials' if res.gpus == 0 else ''}"
             + ("" if evaluation is None else " for pretraining, its probe not included")]
    if evaluation is not None:  # resources.eval: the probe is a job of its own, counted apart
        per_eval = evaluation.gpus * evaluation.time_min / 60
        lines.append(f"evaluation jobs (resources.eval): at most {n * per_eval:.1f} GPU-hours ({n} jobs x "
                     f"{evaluation.gpus} GPU x {evaluation.time_min} min limit, {evaluation.cpus} CPUs each)"
                     f"{'; CPU-only' if evaluation.gpus == 0 else ''}; in all at most {n * (per_trial + per_eval):.1f}")
    first_cfg = driver.points[0][1] if driver.points else None
    if first_cfg is not None and first_cfg.data.dataset == "imagefolder" and res.gpus > 0:
        from harness.planning.input_budget import loader_cores_line

        lines.append(loader_cores_line(first_cfg, res.gpus, res.cpus, runio.RESULTS / "bench"))
    if res.trials_per_job > 1:
        jobs = math.ceil(n / res.trials_per_job)
        lines.append(f"packing: {res.trials_per_job} trials a job, one process each with {threads} thread(s), "
                     f"sharing the job's {res.cpus} CPUs{f' and {res.gpus} GPU' if res.gpus else ''}: {jobs} jobs for "
                     f"{n} trials; GPU-hours at most {jobs * per_trial:.1f} instead of {n * per_trial:.1f} "
                     f"unpacked (saves {(n - jobs) * per_trial:.1f})")
    if driver.kind == "local" and driver.points:  # SLURM jobs run on other machines: no local measurement
        from harness.training.runtime import machine_description

        lines.append(estimate_line(runio.RESULTS, driver.points[0][1], machine_description(), threads, n,
                                   driver.opts.parallel, res.gpus * res.nodes))
    return lines
