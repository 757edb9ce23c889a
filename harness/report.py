"""`python -m harness.report NAME`: a study's (or a suite's) report rebuilt from its storage and run
directories: tables, plots, verdicts, report.md and report.html (harness.reporting)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from harness.execution import tracking
from harness.execution.storage import default_url
from harness.planning.suitefile import suite_path
from harness.reporting import latex
from harness.reporting.study_report import build_report, stored_study
from harness.reporting.suite_report import rebuild_suite_report
from harness.run import process, runio
from harness.run.errors import HarnessError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description="Report of a study or a suite.")
    parser.add_argument("name", help="the study's name (as in results/<name>), or a suite's")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in results/<name>/)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/<name>/report; its TensorBoard logs go under it too)")
    parser.add_argument("--track", metavar="URI",
                        help="send the study's runs and this report to an MLflow server: what it lacks, nothing twice "
                             "(default: the study file's tracking.mlflow, if any)")
    parser.add_argument("--latex-png", action="store_true",
                        help="also compile table.tex with pdflatex and draw it as table.png (needs TeX Live)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        suite = suite_path(args.name)
        out = build_report(args.name, args.storage, args.out) if suite is None else rebuild_suite_report(suite)
        if args.latex_png and (out / "table.tex").exists():
            print(latex.render_png(out / "table.tex"))
        if suite is None:
            study_dir = (runio.RESULTS / args.name).resolve()
            study_file = stored_study(args.name, study_dir)
            uri = args.track or study_file.tracking.get("mlflow")
            if uri and not tracking.catch_up(uri, args.name, args.storage or default_url(study_dir), study_dir,
                                             list(study_file.factors), out):
                return 1
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    process.freeze_imports()
    sys.exit(main())
