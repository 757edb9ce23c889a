"""`python -m harness.study NAME`: run a whole ablation or search with Optuna and submitit.

    python -m harness.study momentum_sweep                      # run (or resume) it, wait, report
    python -m harness.study momentum_sweep --dry-run            # the plan; submits nothing
    python -m harness.study momentum_sweep --status             # where it stands
    python -m harness.study momentum_sweep --recipe imagenet-r50-v1 --executor slurm --no-wait
    python -m harness.study moco_ablation                       # a suite: its studies in order

This face parses, calls and prints; the driver is harness.execution.driver.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from harness.execution import suite as suites
from harness.execution.driver import Driver, Options
from harness.execution.status import dry_run, status_text
from harness.execution.storage import redact
from harness.planning.studyfile import load_study
from harness.planning.suitefile import load_suite, suite_path
from harness.run import process, runio
from harness.run.config import PROBE_PROTOCOLS
from harness.run.errors import HarnessError, require_at_least


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
    parser.add_argument("--evaluate", metavar="PROTOCOL", choices=PROBE_PROTOCOLS,
                        help="add this probe protocol to the study's finished runs (only those that lack it; "
                             "no training), then report both")
    parser.add_argument("--epoch", type=int, metavar="E",
                        help="with --evaluate: probe the checkpoint each run kept at epoch E (runtime.keep_epochs)")
    parser.add_argument("--track", metavar="URI",
                        help="relay the runs to this MLflow tracking server (the driver sends; jobs never connect)")
    parser.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    require_at_least("--parallel", args.parallel, 1, "trials running at once")
    require_at_least("--workers", args.workers, 0, "0: no worker mode")
    require_at_least("--heartbeat", args.heartbeat, 1, "seconds between a worker's beats")
    require_at_least("--db-outage-limit", args.db_outage_limit, 0, "minutes a driver waits out a silent database")
    require_at_least("--poll", args.poll, 0.1, "seconds between the driver's looks at its jobs")
    if args.epoch is not None:
        require_at_least("--epoch", args.epoch, 1, "the epoch whose kept checkpoint is probed")
        if not args.evaluate:
            raise HarnessError("--epoch: goes with --evaluate PROTOCOL (the probe to run on that epoch's checkpoints)")
    opts = Options(recipe=args.recipe, executor=args.executor, storage=args.storage, parallel=args.parallel,
                   overrides=list(args.overrides), wait=not args.no_wait, report=not args.no_report,
                   workers=args.workers, heartbeat=args.heartbeat, poll=args.poll,
                   outage_limit_s=args.db_outage_limit * 60, share=not args.no_share, track=args.track,
                   command=" ".join(["python -m harness.study", *(shlex.quote(redact(a)) for a in argv)]))
    return args, opts


@dataclass(frozen=True)
class Reporting:
    study: Callable[..., Path]
    suite: Callable[..., Path]


def reporting(args, opts: Options) -> Reporting | None:
    """The report's code, imported when the command starts, never when the study ends: a driver that
    ran for days must not report with newer code. None where no report is built (--no-report,
    --dry-run, --status): such a start does not import pandas."""
    if not opts.report or args.dry_run or args.status:
        return None
    from harness.reporting.study_report import build_report
    from harness.reporting.suite_report import build_suite_report

    return Reporting(build_report, build_suite_report)


def run_study(args, opts: Options, report: Reporting | None) -> int:
    driver = Driver(load_study(args.name), opts)
    if args.dry_run:
        print(dry_run(driver))
        return 0
    if args.status:
        print(status_text(driver))
        return 0
    if args.evaluate:
        driver.open()
        try:
            done, failed = driver.evaluate(args.evaluate, args.epoch)
        finally:
            driver.close()
        at = f" of epoch {args.epoch}" if args.epoch else ""
        print(f"[study {driver.name}] {args.evaluate} evaluation{at}: {done} run(s) evaluated"
              + (f"; failed after every try: {'; '.join(failed)}" if failed else ""))
        if report:
            print(f"report: {report.study(driver.name, driver.storage_url)}")
        return 1 if failed else 0
    driver.open_and_run()
    if opts.wait and report:
        out = report.study(driver.name, driver.storage_url)
        print(f"report: {out}")
        if driver.tracker is not None:
            driver.tracker.upload_report(out)
        hints = (out / "hints.txt").read_text().strip() if (out / "hints.txt").exists() else ""
        if hints:  # an undecided fixed design says what would decide it
            print(hints)
    return 0


def run_suite(path: Path, args, opts: Options, report: Reporting | None) -> int:
    """Every member validated, then run in order; then the suite report."""
    suite = load_suite(path)
    if args.dry_run or args.status:
        with tempfile.TemporaryDirectory() as scratch:  # leaves nothing behind
            drivers = suites.member_drivers(suite, opts, Path(scratch))
            print(suites.suite_plan(suite, drivers) if args.dry_run
                  else "\n".join(status_text(driver) for driver in drivers))
        return 0
    drivers = suites.member_drivers(suite, opts, runio.RESULTS / suite.name / "members")
    if suites.run_members(suite, drivers, opts) and report:
        for driver in drivers:
            report.study(driver.name, driver.storage_url)
        print(f"report: {report.suite(suite, [(d.name, d.storage_url) for d in drivers])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        args, opts = parse_args(argv)
        suite = suite_path(args.name)
        report = reporting(args, opts)
        return run_suite(suite, args, opts, report) if suite is not None else run_study(args, opts, report)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    process.freeze_imports()
    sys.exit(main())
