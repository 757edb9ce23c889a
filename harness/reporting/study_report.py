"""`python -m harness.report NAME`: tables, plots and a verdict from a study's storage and run dirs.

Writes results/<study>/report/: trials.csv, curves.csv, summary.csv (and .parquet with pyarrow),
objective/curves/knn-vs-probe plots (PNG + SVG), report.md and a self-contained report.html.
Works on partial studies: running, failed, diverged and pruned trials are shown as such.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import optuna
import pandas as pd

from harness.execution.storage import default_url, open_storage, redact
from harness.planning.studyfile import STUDY_COPY, Study, load_study, load_study_file, skipped_levels
from harness.reporting import consistency_report, early, interaction, latex, protocols, tensorboard
from harness.reporting.page import md_table, render_html
from harness.reporting.plots import (
    plot_curves,
    plot_interaction,
    plot_interval_width,
    plot_knn_vs_probe,
    plot_objective,
    plot_search,
    pyplot,
    save_figure,
    seaborn_module,
)
from harness.reporting.tables import curves_table, factor_names, page_summary, summary_table, trials_table
from harness.reporting.verdicts import DEFAULT_MARGIN, decision_lines, points, race_of, rule_of, seed_hints, verdict
from harness.run import runio
from harness.run import trial_record as record
from harness.run.errors import StudyError


def machine_summary(trials: pd.DataFrame, study_dir: Path) -> str:
    hosts = sorted({h for h in trials["host"].dropna()})
    machines = set()
    for run_dir in trials["run_dir"].dropna():
        for attempt in runio.read_jsonl(study_dir / run_dir / "attempts.jsonl"):
            if attempt.get("machine"):
                machines.add(attempt["machine"])
    return "; ".join(sorted(machines)) or (", ".join(hosts) if hosts else "unknown")


def stored_study(name: str, study_dir: Path) -> Study:
    """The study file the runs were made from: the copy the driver stored with them (studies
    started before copies were stored: studies/<name>.yaml)."""
    copy = study_dir / STUDY_COPY
    base = name.split("@")[0]
    return load_study_file(copy, base) if copy.exists() else load_study(base)


def build_report(name: str, storage_url: str | None = None, out_dir: Path | None = None) -> Path:
    """A study's report from its storage and run directories (works on partial studies).

    Args:
        name: the study's name under the results directory (`results/<name>`; a suite member's is
            `<suite>/<study>`).
        storage_url: its Optuna storage (default: the study directory's SQLite database).
        out_dir: where to write (default: `results/<name>/report`, and the TensorBoard logs beside it,
            `results/<name>/tensorboard`; with out_dir, everything goes under it, `out_dir/tensorboard`:
            a report written elsewhere never touches the study's directory).

    Returns:
        The report directory: trials, curves, summary and dictionary tables (CSV), figures (PNG and
        SVG), report.md, report.html, and hints.txt when seeds would decide an undecided comparison.

    Raises:
        StudyError: no such study in the storage, or a storage that cannot be opened.
    """
    study_dir = (runio.RESULTS / name).resolve()
    storage_url = storage_url or default_url(study_dir)
    try:
        ostudy = optuna.load_study(study_name=name, storage=open_storage(storage_url, heartbeat_s=None))
    except KeyError:
        raise StudyError(f"no study '{name}' in {redact(storage_url)}; run it first (python -m harness.study "
                         f"{name.split('@')[0]}).") from None
    study_file = stored_study(name, study_dir)
    objective = ostudy.user_attrs.get(record.OBJECTIVE, study_file.objective)
    out = out_dir or study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    trials = trials_table(ostudy, study_dir)
    factors = factor_names(ostudy.get_trials(deepcopy=False)) or list(study_file.factors)
    for f in factors:
        if f not in trials:
            trials[f] = None
    curves = curves_table(trials, factors, study_dir)
    summary = summary_table(trials, factors) if len(trials) else pd.DataFrame()
    records = consistency_report.run_diagnostics(trials, study_dir)
    consistency = consistency_report.consistency_table(trials, factors, records) if len(trials) else pd.DataFrame()
    diagnostics = (consistency_report.diagnostics_table(trials, factors, records, study_dir, objective)
                   if len(trials) and factors else pd.DataFrame())
    tables = {"trials": trials, "curves": curves, "summary": summary, "consistency": consistency,
              "diagnostics": diagnostics}
    two_factors = study_file.sampler == "grid" and len(trials) and interaction.is_two_factor_grid(trials, factors)
    interaction_md: list[str] = []
    if two_factors:
        tables["interaction"], interaction_md = _interaction(trials, study_file, factors, objective)
    if study_file.sampler == "grid" and len(trials):  # how early the monitor knew the final answer
        tables["agreement"] = early.agreement(trials, curves, study_file, factors, objective)
    if len(trials) and factors:  # a protocol added to the finished runs (--evaluate)
        probes = protocols.protocol_table(trials, factors, study_dir)
        if len(probes) and probes["protocol"].nunique() > 1:
            tables["protocols"] = probes
    _write_tables(out, tables)

    skipped = not_run_levels(study_file, ostudy.user_attrs.get(record.SIGNATURE, {}))
    plots = _figures(ostudy, study_file, trials, curves, consistency, factors, objective, skipped, bool(two_factors), out)
    pngs = [p for p in plots if p.suffix == ".png"]
    hints = (seed_hints(trials, study_file, factors, objective)
             if study_file.sampler == "grid" and len(trials) else [])
    early_md = (early.markdown(tables["agreement"], objective, int(curves["epoch"].max()), md_table)
                if "agreement" in tables and len(tables["agreement"]) else [])
    protocols_md = protocols.markdown(tables["protocols"], factors, objective, md_table) if "protocols" in tables else []
    md = _markdown(name, ostudy, study_file, objective, trials, factors, summary, pngs, study_dir, skipped,
                   consistency_report.markdown(diagnostics, md_table), hints, interaction_md, early_md, protocols_md)
    (out / "report.md").write_text(md)
    if tensorboard.available() and len(trials):  # rewritten whole from the runs' metrics: never doubled
        tensorboard.write_study(trials, factors, study_dir, (out if out_dir else study_dir) / "tensorboard")
    if study_file.sampler == "grid" and len(summary):
        (out / "table.tex").write_text(paper_table(name, trials, study_file, factors, objective, summary,
                                                   ostudy.user_attrs.get(record.SIGNATURE, {})))
    if hints:  # what would decide an undecided fixed design (the study command prints it)
        (out / "hints.txt").write_text("\n".join(hints) + "\n")
    else:
        (out / "hints.txt").unlink(missing_ok=True)
    (out / "report.html").write_text(render_html(name, md, out))
    return out


def _figures(ostudy, study_file: Study, trials: pd.DataFrame, curves: pd.DataFrame, consistency: pd.DataFrame,
             factors: list[str], objective: str, skipped: list, two_factors: bool, out: Path) -> list[Path]:
    plots: list[Path] = []
    if len(trials):
        plots += plot_objective(trials, factors, objective, study_file.reference, out, skipped)
        plots += plot_curves(curves, factors, out)
        plots += plot_knn_vs_probe(trials, factors, out)
        plots += consistency_report.plot_consistency(consistency, trials, factors, objective, out, pyplot, seaborn_module, save_figure)
        if study_file.race:
            plots += plot_interval_width(trials, study_file, factors, objective, out)
        if two_factors:
            plots += plot_interaction(trials, factors, objective,
                                      interaction.oldest_key_consistency(consistency, factors), out)
    if study_file.sampler == "tpe":
        plots += plot_search(ostudy, out)
    return plots


def _write_tables(out: Path, tables: dict[str, pd.DataFrame]) -> None:
    for stem, df in tables.items():
        df.to_csv(out / f"{stem}.csv", index=False)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return
    for stem, df in tables.items():
        df.to_parquet(out / f"{stem}.parquet", index=False)


def _markdown(name, ostudy, study_file: Study, objective: str, trials: pd.DataFrame, factors: list[str],
              summary: pd.DataFrame, pngs: list[Path], study_dir: Path, skipped: list[tuple[dict, str]],
              dictionary: Sequence[str] = (), hints: list[str] | None = None, interaction_md: Sequence[str] = (),
              early_md: Sequence[str] = (), protocols_md: Sequence[str] = ()) -> str:
    verdicts = verdict(trials, factors, objective, study_file.direction == "maximize", rule_of(study_file)) if len(trials) else []
    starts = [t.datetime_start for t in ostudy.trials if t.datetime_start]
    ends = [t.datetime_complete for t in ostudy.trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() / 60 if starts and ends else float("nan")
    signature = ostudy.user_attrs.get(record.SIGNATURE, {})
    counts = trials["state"].value_counts().to_dict() if len(trials) else {}
    md = [f"# Study `{name}`", "", study_file.description.strip(), "",
          f"- recipe: `{signature.get('recipe', study_file.recipe)}`; the study file's overrides: "
          f"`{study_file.overrides}`; the command's (`--set`): `{signature.get('overrides') or []}`",
          f"- objective: {objective} ({study_file.direction}); trials: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
          f"- machine: {machine_summary(trials, study_dir) if len(trials) else 'unknown'}",
          f"- wall time, first trial start to last trial end: {wall:.1f} min", "",
          "## Verdict", "", *[f"- {line}" for line in verdicts], "",
          *(["## Decisions", "", *decision_lines(trials, study_file, factors, objective, hints), ""]
            if study_file.sampler == "grid" and len(trials) else []),
          *(["## Interaction", "", *interaction_md, ""] if interaction_md else []),
          *(["## How early the answer was known", "", *early_md, ""] if early_md else []),
          *(["## Probe protocols", "", *protocols_md, ""] if protocols_md else []),
          "## Summary (per level)", "", md_table(page_summary(summary, factors)) if len(summary) else "(no trials)",
          "", "All columns, the 95 % intervals' ends apart: `summary.csv`.", "", *dictionary]
    if study_file.reference.get("values"):
        md += [f"Paper reference ({study_file.reference.get('source', '')}; {study_file.reference.get('metric', '')}) "
               "is drawn in its own panel: a different dataset and scale, never on our y-axis.", ""]
    md += _not_run_section(skipped, factors)
    md += _shared_section(trials)
    failed = trials[~trials["state"].isin(["COMPLETE"])] if len(trials) else trials
    if len(failed):
        md += ["## Trials not completed", "", md_table(failed[["trial", "key", "state", "failure_reason"]]), ""]
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})\n" for p in pngs]
    return "\n".join(md) + "\n"


def paper_table(name: str, trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str,
                summary: pd.DataFrame, signature: dict) -> str:
    """table.tex: the summary as the paper's table (a table environment to \\input; latex.document wraps it
    to compile), the paired decisions marking the worse levels."""
    spec, state, _ = race_of(trials, study_file, factors, objective)
    verdicts = {level: c.verdict for level, c in {**state.decisions, **state.current}.items()}
    comparisons = max(len(state.seeds) - 1, 1)
    scale, unit = points(objective)
    rule = (f"paired t-intervals at the error rate {1 - spec.confidence:.2g} split over {comparisons} comparison(s); "
            f"margin {spec.margin * scale:g}{unit}")
    seeds = spec.max if study_file.race else len(study_file.seeds)
    return "\n".join([latex.study_table(
        name, summary, factors, objective, verdicts, state.best, study_file.reference,
        signature.get("recipe", study_file.recipe), seeds, rule, study_file.direction == "maximize")])


def _interaction(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str):
    """The interaction contrasts of a two-factor grid: their table and the report's lines, at the
    study's error rate and margin (a race's, else the fixed design's defaults)."""
    confidence = study_file.race.confidence if study_file.race else 0.95
    margin = study_file.race.margin if study_file.race else DEFAULT_MARGIN
    scale, unit = points(objective)
    found = interaction.contrasts(trials, factors, objective, confidence, margin)
    return (interaction.contrast_table(found, scale),
            interaction.contrast_lines(found, margin, confidence, unit, scale))


def not_run_levels(study_file: Study, signature: dict) -> list[tuple[dict, str]]:
    """Levels of the grid that a mechanism cannot take (end-to-end's K is its batch), or that the
    recipe's data cannot hold: shown as not run, with why, rather than missing without a word."""
    if study_file.sampler != "grid":
        return []
    recipe = signature.get("recipe")
    try:
        return skipped_levels(study_file, None if recipe in (None, study_file.recipe) else recipe,
                              signature.get("overrides") or [])
    except (StudyError, ValueError):  # the study file no longer builds with this code: nothing to add
        return []


def _not_run_section(skipped: list[tuple[dict, str]], factors: list[str]) -> list[str]:
    if not skipped:
        return []
    rows = pd.DataFrame([{**{f: level.get(f) for f in factors}, "why not run": why} for level, why in skipped])
    return ["## Levels not run", "", md_table(rows), ""]


def _shared_section(trials: pd.DataFrame) -> list[str]:
    """Trials that reused a run another study had finished (same identity, same seed)."""
    if not len(trials) or "shared_from" not in trials or not trials["shared_from"].notna().any():
        return []
    shared = trials[trials["shared_from"].notna()]
    hours = shared["shared_hours"].fillna(0).astype(float).sum()
    return ["## Shared runs", "",
            f"{len(shared)} of {len(trials)} trials were not trained here: another study had already finished the "
            f"same run (same identity: config and seed), and its result was reused ({hours:.2f} h of training "
            f"saved). Their run directories are links to it.", "",
            md_table(shared[["trial", "key", "state", "probe_top1", "shared_from"]]), ""]


