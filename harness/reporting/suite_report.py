"""One report for a suite (harness.execution.suite): every member's panel beside the paper's values, its levels'
means and verdict, and what the suite cost: runs trained, runs shared, CPU- and GPU-hours.

Writes results/<suite>/report/: cost.csv, summary.csv (every member's levels), report.md and a
self-contained report.html; each member keeps its own full report in results/<suite>/<member>/report/.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pandas as pd

from harness.execution.storage import default_url, open_storage
from harness.planning.suitefile import load_suite
from harness.reporting import consistency_report
from harness.reporting.page import md_table, render_html
from harness.reporting.study_report import build_report, machine_summary, stored_study
from harness.reporting.tables import factor_names, summary_table, trials_table
from harness.reporting.verdicts import rule_of, verdict
from harness.run import runio
from harness.run import trial_record as record

SUMMARY_COLUMNS = ["n", "probe_top1_mean", "probe_top1_ci95_low", "probe_top1_ci95_high", "knn_top1_mean",
                   "diverged", "failed"]


def cpu_hours(study_dir: Path, run_dir: str | None, hours: float) -> float:
    """Training hours x the CPU threads the run used (its last attempt's)."""
    attempts = runio.read_jsonl(study_dir / run_dir / "attempts.jsonl") if run_dir else []
    threads = (attempts[-1].get("runtime") or {}).get("threads") if attempts else None
    return hours * (threads or 1)


def cost_row(member: str, suite: str, trials: pd.DataFrame, study_dir: Path) -> dict:
    shared = trials["shared_from"].notna() if "shared_from" in trials else pd.Series(False, index=trials.index)
    within = shared & trials.get("shared_from", pd.Series(dtype=str)).fillna("").str.startswith(f"{suite}/")
    trained = trials[~shared & (trials["state"] != "RUNNING")]
    hours = trained["hours"].fillna(0).astype(float)
    return {"study": member, "trials": len(trials), "trained": len(trained),
            "shared within the suite": int(within.sum()), "shared with other studies": int((shared & ~within).sum()),
            "training hours": float(hours.sum()),
            "CPU-hours": sum(cpu_hours(study_dir, r, h) for r, h in zip(trained["run_dir"], hours)),
            "GPU-hours": float(trained["gpu_hours"].fillna(0).astype(float).sum()),
            "hours saved by sharing": float(trials.loc[shared, "shared_hours"].fillna(0).astype(float).sum())
            if "shared_hours" in trials else 0.0}


def dictionary_section(member: str, study_dir: Path, factors: list[str], out: Path) -> list[str]:
    """For the studies of the paper's argument (momentum, dictionary mechanism): key consistency against
    key age beside the accuracy, from the member's own report."""
    if not {"moco.momentum", "moco.key_encoder"} & set(factors):
        return []
    report = study_dir / "report"
    lines = []
    if (report / "diagnostics.csv").exists():
        table = pd.read_csv(report / "diagnostics.csv")
        if len(table):
            lines += consistency_report.markdown(table.astype(object).where(table.notna(), None), md_table)[2:]
    if (report / "consistency.png").exists():
        shutil.copyfile(report / "consistency.png", out / f"{member}-consistency.png")
        lines += [f"![{member}: key consistency vs age]({member}-consistency.png)", ""]
    return lines


def build_suite_report(suite, members: list[tuple[str, str]]) -> Path:
    """`members`: (study name, storage URL) of each member, in the suite's order; each member's own
    report must exist (its objective figure is reused)."""
    out = runio.RESULTS / suite.name / "report"
    out.mkdir(parents=True, exist_ok=True)
    costs, summaries, sections, machines, spans = [], [], [], set(), []
    for name, url in members:
        study_dir = (runio.RESULTS / name).resolve()
        ostudy = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_s=None))
        study_file = stored_study(name, study_dir)
        member = name.split("/", 1)[-1]
        trials = trials_table(ostudy, study_dir)
        factors = factor_names(ostudy.get_trials(deepcopy=False)) or list(study_file.factors)
        costs.append(cost_row(member, suite.name, trials, study_dir))
        spans += [(t.datetime_start, t.datetime_complete) for t in ostudy.trials
                  if t.datetime_start and t.datetime_complete and record.SHARED_FROM not in t.user_attrs]
        if len(trials):
            machines.add(machine_summary(trials, study_dir))
        summary = summary_table(trials, factors) if len(trials) else pd.DataFrame()
        if len(summary):
            summaries.append(summary.assign(study=member))
        figure = study_dir / "report" / "objective.png"
        if figure.exists():
            shutil.copyfile(figure, out / f"{member}-objective.png")
        ref = study_file.reference
        sections += [f"## {member}", "", study_file.description.strip(), "",
                     *([f"Paper: {ref.get('source', '')}; {ref.get('metric', '')} — right-hand panel."]
                       if ref.get("values") else ["The paper gives no value for this factor."]), "",
                     *([f"![{member}]({member}-objective.png)", ""] if figure.exists() else []),
                     md_table(summary[[*factors, *SUMMARY_COLUMNS]]) if len(summary) else "(no trials)", "",
                     *[f"- {line}" for line in verdict(trials, factors, study_file.objective,
                                                       study_file.direction == "maximize", rule_of(study_file)) if len(trials)],
                     "", *dictionary_section(member, study_dir, factors, out),
                     f"Full report: `{name}/report/report.html`.", ""]
    cost = pd.DataFrame(costs)
    total = {"study": "suite", **{c: cost[c].sum() for c in cost.columns if c != "study"}}
    cost = pd.concat([cost, pd.DataFrame([total])], ignore_index=True)
    cost.to_csv(out / "cost.csv", index=False)
    if summaries:
        pd.concat(summaries, ignore_index=True).to_csv(out / "summary.csv", index=False)
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds() / 3600 if spans else float("nan")
    md = [f"# Suite `{suite.name}`", "", suite.description.strip(), "",
          f"- studies: {', '.join(c['study'] for c in costs)}",
          f"- machine: {'; '.join(sorted(machines)) or 'unknown'}",
          f"- wall time of the runs trained here, first start to last end: {wall:.2f} h", "",
          "## What the suite cost", "",
          f"{int(total['trials'])} trials; {int(total['trained'])} runs trained, "
          f"{int(total['shared within the suite'])} shared between the suite's studies and "
          f"{int(total['shared with other studies'])} with studies outside it (same identity: config and seed, "
          f"trained once).", "", md_table(cost), "", *sections]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(render_html(f"suite {suite.name}", text, out))
    # The paper's tables of every member in one file, in the suite's order (each member's table.tex).
    tables = [runio.RESULTS / name / "report" / "table.tex" for name, _ in members]
    (out / "table.tex").write_text("\n".join(p.read_text() for p in tables if p.exists()))
    return out


def rebuild_suite_report(path: Path) -> Path:
    """A suite's member reports and its one-page report, from the members' storages under
    results/<suite>/ (default SQLite storages)."""
    suite = load_suite(path)
    members = []
    for member in suite.members:
        name = f"{suite.name}/{member.study}"
        url = default_url((runio.RESULTS / name).resolve())
        build_report(name, url)
        members.append((name, url))
    return build_suite_report(suite, members)
