"""`python -m harness.report NAME`: tables, plots and a verdict from a study's storage and run dirs.

Writes results/<study>/report/: trials.csv, curves.csv, summary.csv (and .parquet with pyarrow),
objective/curves/knn-vs-probe plots (PNG + SVG), report.md and a self-contained report.html.
Works on partial studies: running, failed, diverged and pruned trials are shown as such.
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from harness.execution.storage import default_url, open_storage, redact
from harness.planning.decide import (
    EQUAL,
    SLIGHTLY_WORSE,
    UNDECIDED,
    WORSE,
    RaceSpec,
    level_label,
    race,
    seeds_to_decide,
    values_by_level,
)
from harness.planning.studyfile import STUDY_COPY, Study, StudyError, load_study, load_study_file, skipped_levels
from harness.reporting import consistency_report
from harness.run import runio
from harness.run.outcome import state_label

METRICS = ("probe_top1", "knn_top1")


def _plt():
    """matplotlib's pyplot, loaded when a figure is drawn (a driver imports this module at its start
    and should not pay seconds of plotting imports until the report)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    matplotlib.rcParams["svg.hashsalt"] = "harness"  # the same figure, the same SVG: rebuilt reports diff clean
    import matplotlib.pyplot as plt

    return plt


def _sns():
    _plt()
    import seaborn as sns

    return sns


# ---------------------------------------------------------------- tables


def factor_names(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    names: list[str] = []
    for t in trials:
        for key in t.params:
            if key != "seed" and key not in names:
                names.append(key)
    return names


def trials_table(ostudy: optuna.Study, study_dir: Path) -> pd.DataFrame:
    """One row per trial. `run_dir` is relative to the study directory (a table that travels)."""
    trials = ostudy.get_trials(deepcopy=False)
    factors = factor_names(trials)
    rows = []
    for t in trials:
        a = t.user_attrs
        state = state_label(t.state.name, a)
        run_dir = _relative(study_dir, a.get("run_dir"))
        row = {"trial": t.number, "key": a.get("key"), **{f: t.params.get(f) for f in factors},
               "seed": t.params.get("seed", a.get("seed")), "state": state,
               "failure_reason": a.get("failure_reason"), "probe_top1": a.get("probe_top1"),
               "probe_top5": a.get("probe_top5"), "pixel_floor_top1": a.get("pixel_floor_top1"),
               "knn_top1": a.get("knn_top1"), "final_loss": a.get("final_loss"),
               "chance_loss": _chance_loss(study_dir, run_dir), "epochs": a.get("epochs"),
               "gpu_hours": a.get("gpu_hours"), "hours": a.get("hours"), "job_id": a.get("job_id"),
               "host": a.get("host"), "identity": a.get("identity"), "run_dir": run_dir,
               "shared_from": a.get("shared_from"), "shared_hours": a.get("shared_hours")}
        if t.state == optuna.trial.TrialState.RUNNING and run_dir:
            epochs = [r for r in runio.read_jsonl(study_dir / run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
            if epochs:
                row.update(epochs=epochs[-1]["epoch"], knn_top1=epochs[-1].get("knn_top1"))
        rows.append(row)
    return pd.DataFrame(rows)


def _relative(study_dir: Path, run_dir: str | None) -> str | None:
    """The run directory relative to the study directory. Storages written before run directories
    were recorded relative hold absolute paths: a study moved since (a committed example) is found by
    the path's runs/<key> tail."""
    if not run_dir:
        return None
    path = Path(run_dir)
    if not path.is_absolute():
        return run_dir
    try:
        return str(path.relative_to(study_dir))
    except ValueError:
        tail = Path(*path.parts[-2:])
        return str(tail) if (study_dir / tail).is_dir() else run_dir


def _chance_loss(study_dir: Path, run_dir: str | None) -> float | None:
    """ln(K + 1): the InfoNCE loss of an encoder that cannot tell its positive from the K negatives."""
    config = study_dir / run_dir / "config.yaml" if run_dir else None
    if config is None or not config.exists():
        return None
    import yaml

    moco = (yaml.safe_load(config.read_text()) or {}).get("moco", {})
    if moco.get("key_encoder") == "end_to_end":
        return None
    return math.log(moco.get("queue_size", 0) + 1) if moco.get("queue_size") else None


def curves_table(trials: pd.DataFrame, factors: list[str], study_dir: Path) -> pd.DataFrame:
    rows = []
    for _, t in trials.iterrows():
        if not t.get("run_dir"):
            continue
        for r in runio.read_jsonl(study_dir / t["run_dir"] / "metrics.jsonl"):
            if r.get("kind") == "epoch":
                rows.append({"trial": t["trial"], **{f: t[f] for f in factors}, "seed": t["seed"], "state": t["state"],
                             "epoch": r["epoch"], "loss": r.get("loss"), "knn_top1": r.get("knn_top1"),
                             "lr": r.get("lr")})
    return pd.DataFrame(rows, columns=["trial", *factors, "seed", "state", "epoch", "loss", "knn_top1", "lr"])


def summary_table(trials: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """Per level (combination of factors): n, mean and std of probe top-1 and kNN, failures, GPU-hours."""
    rows = []
    for level, group in trials.groupby(factors, dropna=False, sort=True):
        level = level if isinstance(level, tuple) else (level,)
        done = group[group["state"] == "COMPLETE"]
        row = dict(zip(factors, level))
        row["n"] = len(done)
        for metric in METRICS:
            values = done[metric].dropna().astype(float)
            row[f"{metric}_mean"] = values.mean() if len(values) else np.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            half = ci95_half(values)
            row[f"{metric}_ci95_low"], row[f"{metric}_ci95_high"] = row[f"{metric}_mean"] - half, \
                row[f"{metric}_mean"] + half
        row["final_loss_mean"] = done["final_loss"].dropna().astype(float).mean() if len(done) else np.nan
        row["failed"] = int((group["state"] == "FAIL").sum())
        row["diverged"] = int((group["state"] == "DIVERGED").sum())
        row["pruned"] = int((group["state"] == "PRUNED").sum())
        row["running"] = int((group["state"] == "RUNNING").sum())
        row["gpu_hours"] = float(group["gpu_hours"].fillna(0).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def ci95_half(values) -> float:
    """Half-width of the 95 % t-interval of a mean over seeds (NaN below two seeds)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return np.nan
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def verdict(trials: pd.DataFrame, factors: list[str], objective: str, maximize: bool = True) -> list[str]:
    """Best level per factor and whether it beats the runner-up beyond seed noise (Welch's t-test).
    With several factors, a factor's levels are compared within each combination of the others (the
    memory bank's K against the memory bank's, not pooled with MoCo's)."""
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=[objective])
    lines = []
    for factor in factors:
        others = [f for f in factors if f != factor]
        if not others:
            lines.append(_best_level(done, factor, objective, maximize, factor))
            continue
        compared = False
        for held, part in done.groupby(others, sort=True):
            held = held if isinstance(held, tuple) else (held,)
            if part[factor].nunique() > 1:  # one level run at this combination: nothing to compare
                at = ", ".join(f"{f} = {v}" for f, v in zip(others, held))
                lines.append(_best_level(part, factor, objective, maximize, f"{factor} (at {at})"))
                compared = True
        if done[factor].nunique() == 1:
            lines.append(f"{factor}: one level only ({done[factor].iloc[0]}): nothing to compare.")
        elif not compared:
            lines.append(f"{factor}: no combination of the other factors has two of its levels completed yet.")
    lines += floor_verdict(done, factors, objective)
    done_all = trials[trials["state"] == "COMPLETE"].dropna(subset=["final_loss", "chance_loss"])
    for factor in factors:
        for level, g in done_all.groupby(factor):
            ratio = (g["final_loss"] / g["chance_loss"]).mean()
            if ratio > 0.9:
                lines.append(f"{factor} = {level}: completed, but the final loss {g['final_loss'].mean():.2f} stayed "
                             f"near ln(K+1) = {g['chance_loss'].mean():.2f} (the positive barely beats the negatives): "
                             f"training did not converge, without diverging.")
    dead = trials[trials["state"] == "DIVERGED"]
    for factor in factors:
        for level, g in dead.groupby(factor):
            lines.append(f"{factor} = {level}: {len(g)} run(s) diverged (loss NaN/inf) — reported as 'fail'.")
    return lines


def _best_level(done: pd.DataFrame, factor: str, objective: str, maximize: bool, label: str) -> str:
    from scipy import stats

    groups = {lvl: g[objective].astype(float).to_numpy() for lvl, g in done.groupby(factor, sort=True)}
    if not groups:
        return f"{label}: no completed trial yet."
    ranked = sorted(groups, key=lambda lvl: groups[lvl].mean(), reverse=maximize)
    best = ranked[0]
    text = f"{label}: best level {best} ({objective} {groups[best].mean():.4f}, n={len(groups[best])})"
    if len(ranked) == 1:
        return text + "; no other level completed to compare with."
    second = ranked[1]
    a, b = groups[best], groups[second]
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return text + f"; runner-up {second} ({b.mean():.4f}); too few seeds to test the difference."
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return text + (f"; runner-up {second} ({b.mean():.4f}), difference {a.mean() - b.mean():+.4f}, Welch's t-test "
                   f"p = {p:.3g}: " + ("beyond seed noise." if p < 0.05 else "within seed noise."))


DEFAULT_MARGIN = 0.005  # a fixed design's decision table, when the study file names no `decide`


def race_of(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str):
    """The study's race (harness.decide) replayed on its results; a fixed design is a race of one look."""
    spec = study_file.race or RaceSpec(len(study_file.seeds), len(study_file.seeds), DEFAULT_MARGIN, 0.95)
    values, diverged = race_values(trials, study_file, factors, objective)
    return spec, race(values, spec, study_file.direction == "maximize"), diverged


def race_values(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str):
    levels = list(dict.fromkeys(tuple(r) for r in trials[factors].itertuples(index=False)))
    rows = [{**r, objective: r[objective] if pd.notna(r[objective]) else None}
            for r in trials[[*factors, "seed", "state", objective]].to_dict("records")]
    return values_by_level(rows, factors, levels, objective, study_file.seeds)


def decision_lines(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str) -> list[str]:
    """The decision table: each level against the best, paired by seed, with its interval."""
    spec, state, diverged = race_of(trials, study_file, factors, objective)
    if state.best is None:
        short = [f"{level_label(lvl, factors)} ({len(v)} of {spec.initial})" for lvl, v in
                 race_values(trials, study_file, factors, objective)[0].items() if len(v) < spec.initial]
        return [f"No decision yet: the first {spec.initial} seeds of every level are not all completed "
                f"(completed so far: {', '.join(short)})."]
    label = lambda level: level_label(level, factors)  # noqa: E731
    pct = 100 if objective.endswith("top1") else 1
    unit = " pt" if pct == 100 else ""
    comparisons = max(len(state.seeds) - 1, 1)
    plan = spec.plan(len(state.seeds))
    if spec.looks == 1:
        rule = (f"the error rate {1 - spec.confidence:.2g} split (Bonferroni) over {comparisons} comparison(s): each "
                f"interval at {100 * (1 - plan[0][2]):.2f} %")
    else:
        rule = (f"the error rate {1 - spec.confidence:.2g} split (Bonferroni) over {comparisons} comparison(s), each "
                f"spending its share over {spec.looks} looks ({SPENDING_NAMES[spec.spending]}): intervals at "
                + ", ".join(f"{100 * (1 - level):.3f} %" for _, _, level in plan) + f" at {spec.initial}..{spec.max} seeds")
    lines = [f"Paired by seed against the best level; t-intervals of the mean paired difference, {rule}. "
             f"Practically equal: the interval inside ± {spec.margin * pct:g}{unit}"
             f"{'' if study_file.race else ' (the default margin; set decide: {margin: ...} in the study file)'}.",
             "", "| comparison | difference | interval | n | decision |", "|---|---|---|---|---|"]
    words = {WORSE: "better", SLIGHTLY_WORSE: "better, by less than the margin", EQUAL: "practically equal",
             UNDECIDED: "undecided"}
    for c in [*state.decisions.values(), *state.current.values()]:
        decision = words[c.verdict]
        if c.verdict == UNDECIDED and state.done:
            decision = (f"undecided at {c.n} seeds: the difference is below ± {(c.high - c.low) / 2 * pct:.2g}{unit}, "
                        f"what {c.n} seeds can resolve")
        lines.append(f"| {label(c.best)} vs {label(c.level)} | {-c.diff * pct:+.2f}{unit} | [{-c.high * pct:+.2f}, "
                     f"{-c.low * pct:+.2f}] | {c.n} | {decision} |")
    lines += [f"| {label(level)} | | | | diverged: out of the race |" for level in diverged]
    fixed = len(state.seeds) * spec.max + len(diverged) * spec.max
    ran = int((trials["state"] != "RUNNING").sum())
    lines += ["", f"Best: {label(state.best)}. Trials run: {ran} of the fixed design's {fixed} at {spec.max} seeds per "
              f"level ({100 * ran / max(fixed, 1):.0f} %){'' if state.done else '; the race goes on'}."]
    asked = sum(state.seeds.values())
    if state.done and study_file.race and ran > asked:  # e.g. seeds run under an earlier rule, kept, not used
        lines[-1] += (f" This rule asked for {asked} of them; the other {ran - asked} (seeds past a level's "
                      "decision, run under an earlier rule) are in the tables but not in the decisions.")
    hints = seed_hints(trials, study_file, factors, objective)
    return lines + (["", *hints] if hints else [])


SPENDING_NAMES = {"obrien-fleming": "O'Brien-Fleming-type spending", "pocock": "Pocock-type spending",
                  "bonferroni": "evenly, Bonferroni"}


def seed_hints(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str) -> list[str]:
    """For a fixed design: about how many seeds would decide each comparison it left undecided, from
    the observed paired spread, and how to spend them only where needed (a race)."""
    if study_file.race:
        return []
    spec, state, _ = race_of(trials, study_file, factors, objective)
    if not state.done or not state.current:
        return []
    values, _ = race_values(trials, study_file, factors, objective)
    sign = 1.0 if study_file.direction == "maximize" else -1.0
    pct, unit = (100, " pt") if objective.endswith("top1") else (1, "")
    alpha = spec.plan(len(state.seeds))[0][2]
    lines, most = [], 0
    for c in state.current.values():
        diffs = sign * (np.asarray(values[c.level][:c.n]) - np.asarray(values[c.best][:c.n]))
        sd = float(np.std(diffs, ddof=1))
        n = seeds_to_decide(float(diffs.mean()), sd, spec.margin, alpha)
        most = max(most, n or 0)
        lines.append(f"- {level_label(c.best, factors)} vs {level_label(c.level, factors)}: "
                     + (f"about {n} seeds per level would decide it" if n else "more than 200 seeds per level would "
                        "be needed to decide it")
                     + f" (80 % of the time, if the paired differences keep their mean {-c.diff * pct:+.2f}{unit} and "
                       f"spread {sd * pct:.2g}{unit}).")
    if not lines:
        return []
    name = study_file.name.split("@")[0].split("/")[-1]  # a suite's member: its own study file
    return [f"What would decide the undecided comparisons (from {state.seeds[state.best]} seeds' paired spread; "
            "a rough guide, the spread of two seeds is itself uncertain):", "", *lines, "",
            f"A race spends such seeds only where undecided: in the study file write `seeds: {{initial: "
            f"{max(2, state.seeds[state.best])}, max: {max(most, 2)}}}` and `decide: {{margin: {spec.margin:g}}}`, "
            f"then run `python -m harness.study {name}` (the finished seeds are reused)."]


def plot_interval_width(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str,
                        out: Path) -> list[Path]:
    """How the comparisons' interval narrows with seeds (adaptive studies)."""
    spec, state, _ = race_of(trials, study_file, factors, objective)
    if len(state.widths) < 2:
        return []
    fig, ax = _plt().subplots(figsize=(5.5, 4))
    n, width = zip(*state.widths)
    ax.plot(n, width, marker="o", label="mean interval width of the levels still compared")
    ax.axhline(2 * spec.margin, color="gray", ls=":", label="2 x margin: narrower can show 'equal'")
    ax.set(xlabel="seeds per level", ylabel=f"interval width ({objective})", yscale="log")
    ax.set_title("Decision intervals vs seeds", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "interval_width")


def recorded_pixel_floor(trials: pd.DataFrame, objective: str) -> float | None:
    """The raw-pixel linear probe the trials recorded, when the objective is the probe and all agree."""
    if objective != "probe_top1" or "pixel_floor_top1" not in trials:
        return None
    floors = trials["pixel_floor_top1"].dropna().unique()
    return float(floors[0]) if len(floors) == 1 else None


def floor_verdict(done: pd.DataFrame, factors: list[str], objective: str) -> list[str]:
    """Which levels beat a linear probe on raw pixels: below it, a representation learned nothing useful."""
    floor = recorded_pixel_floor(done, objective)
    if floor is None:
        return []
    lines = []
    # With several factors, each combination of levels is a level (pooling would hide the weak ones).
    for name, by in ([(f, f) for f in factors] if len(factors) == 1 else [(" x ".join(factors), factors)]):
        means = done.groupby(by, sort=True)[objective].mean()
        show = lambda lvl: ", ".join(map(str, lvl)) if isinstance(lvl, tuple) else str(lvl)  # noqa: E731
        above = [f"{show(lvl)} ({m - floor:+.4f})" for lvl, m in means.items() if m > floor]
        below = [f"{show(lvl)} ({m - floor:+.4f})" for lvl, m in means.items() if m <= floor]
        sep = ", " if len(factors) == 1 else "; "  # combinations are themselves comma-separated
        lines.append(f"{name} vs the raw-pixel floor {floor:.4f} (the same linear probe on pixels): above it: "
                     f"{sep.join(above) or 'no level'}; not above it: {sep.join(below) or 'no level'}.")
    return lines


# ---------------------------------------------------------------- plots

# Natural axes of the paper's factors, keyed by the full dotted key (optim.momentum, SGD's momentum,
# is not the key encoder's m and gets no rule).
AXES = {
    "moco.momentum": (lambda v: 1.0 - v, "1 − m (log scale; m = 0 at 1)", "log10", lambda x: f"m={1 - x:g}"),
    "moco.queue_size": (lambda v: v, "K (log2 scale)", "log2", lambda x: f"{x:g}"),
}


def _axis(factor: str, values: pd.Series):
    """Each factor on its natural axis: 1 - m on a log scale, K on log2, others linear/categorical."""
    if factor in AXES:
        transform, label, scale, _ = AXES[factor]
        return transform(values.astype(float)), label, scale
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype(float), factor, "linear"
    return values.astype(str), factor, "category"


def _apply_scale(ax, scale: str, ticks: pd.Series | None = None, factor: str = "") -> None:
    if scale == "log10":
        ax.set_xscale("log")
    elif scale == "log2":
        ax.set_xscale("log", base=2)
    if ticks is not None and scale in ("log10", "log2"):
        levels = sorted(set(ticks.astype(float)))
        ax.set_xticks(levels)
        tick_label = AXES[factor][3] if factor in AXES else (lambda x: f"{x:g}")
        ax.set_xticklabels([tick_label(v) for v in levels], rotation=30 if factor == "moco.momentum" else 0)
        ax.minorticks_off()


def plot_objective(trials: pd.DataFrame, factors: list[str], objective: str, reference: dict, out: Path,
                   skipped: list[tuple[dict, str]] = ()) -> list[Path]:
    """Objective vs the first factor on its natural axis (hue: the second factor); the paper's values,
    when the study file gives them, in a separate panel: a different dataset and scale. Levels not
    run are named under the panel."""
    x_factor, hue = factors[0], (factors[1] if len(factors) > 1 else None)
    df = trials.copy()
    df["x"], xlabel, scale = _axis(x_factor, df[x_factor])
    order = list(dict.fromkeys(df["x"])) if scale == "category" else None

    def pos(xs: pd.Series) -> pd.Series:
        return xs.map(order.index) if order else xs

    def finish(ax, ticks: pd.Series, ylabel: str, title: str) -> None:
        if order:
            ax.set_xticks(range(len(order)), order)
        _apply_scale(ax, scale, ticks, x_factor)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)

    has_ref = bool(reference.get("values")) and x_factor in pd.DataFrame(reference.get("values") or [{}])
    fig, axes = _plt().subplots(1, 2 if has_ref else 1, figsize=(11 if has_ref else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    done = df[df["state"] == "COMPLETE"].dropna(subset=[objective])
    hue_values = sorted(df[hue].dropna().unique(), key=str) if hue else [None]
    palette = dict(zip(hue_values, _sns().color_palette("deep", len(hue_values))))
    for hv in hue_values:
        part = done if hv is None else done[done[hue] == hv]
        if not len(part):
            continue
        agg = part.groupby("x")[objective].agg(["mean", ci95_half]).reset_index()
        ax.scatter(pos(part["x"]), part[objective], color=palette[hv], alpha=0.55, s=22)
        ax.errorbar(pos(agg["x"]), agg["mean"], yerr=agg["ci95_half"].fillna(0), color=palette[hv], marker="o",
                    capsize=4, lw=1.5, ls="none" if order else "-",  # categories are not a line's points
                    label=f"{hue} = {hv}" if hue else "mean and 95 % interval over seeds")
    pixels = recorded_pixel_floor(done, objective)
    if pixels is not None:
        ax.axhline(pixels, color="gray", ls=":", lw=1.2, label=f"linear probe on raw pixels ({pixels:.3f})")
    floor = done[objective].min() if len(done) else 0.0
    for state, color, label in (("DIVERGED", "crimson", "diverged (the paper's 'fail')"),
                                ("FAIL", "gray", "failed (error, after retries)")):
        bad = df[df["state"] == state]
        if len(bad):
            ax.scatter(pos(bad["x"]), [floor] * len(bad), marker="x", color=color, s=60, label=label)
    finish(ax, df["x"], f"{objective} (this study)", "This study: per-seed points, mean and 95 % interval")
    if skipped:  # named under the panels; the report's "Levels not run" says why
        levels = ", ".join(" ".join(f"{k.split('.')[-1]}={v}" for k, v in level.items()) for level, _ in skipped)
        fig.text(0.01, 0.01, f"not run (see 'Levels not run'): {levels}", fontsize=7, color="dimgray")
    if has_ref:
        ref = pd.DataFrame(reference["values"])
        ref["x"], _, _ = _axis(x_factor, ref[x_factor])
        numeric = pd.to_numeric(ref["value"], errors="coerce")
        ok, fails = ref[numeric.notna()].assign(value=numeric[numeric.notna()]), ref[numeric.isna()]
        rhue = hue if hue in ref else None
        rax = axes[0][1]
        for hv, part in (ok.groupby(rhue) if rhue else [(None, ok)]):
            part = part.sort_values("x")
            rax.plot(pos(part["x"]), part["value"], marker="s", ls="--", color=palette.get(hv, "gray"),
                     label=f"{rhue} = {hv}" if rhue else "paper")
        if len(fails):
            rax.scatter(pos(fails["x"]), [ok["value"].min() if len(ok) else 0] * len(fails), marker="x",
                        color="crimson", s=60, label="fail (paper)")
        finish(rax, ref["x"], reference.get("metric", "paper"), "Paper (different dataset and scale)")
    fig.tight_layout(rect=(0, 0.05, 1, 1) if skipped else (0, 0, 1, 1))
    return _save(fig, out / "objective")


def plot_curves(curves: pd.DataFrame, factors: list[str], out: Path) -> list[Path]:
    if curves.empty:
        return []
    df = curves.copy()
    df["level"] = df[factors].astype(str).agg(", ".join, axis=1)
    metrics = [m for m in ("loss", "knn_top1") if df[m].notna().any()]
    fig, axes = _plt().subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _sns().lineplot(data=df, x="epoch", y=metric, hue="level", errorbar="sd", marker="o", ax=ax)
        ax.set_title(f"{metric} vs epoch (band: ± std over seeds)")
        ax.legend(title=", ".join(factors), fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "curves")


def plot_knn_vs_probe(trials: pd.DataFrame, factors: list[str], out: Path) -> list[Path]:
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=["knn_top1", "probe_top1"])
    if done.empty:
        return []
    df = done.copy()
    df["level"] = df[factors].astype(str).agg(", ".join, axis=1)
    fig, ax = _plt().subplots(figsize=(5.5, 4.2))
    _sns().scatterplot(data=df, x="knn_top1", y="probe_top1", hue="level", s=50, ax=ax)
    ax.set_title("kNN monitor vs linear probe (final)")
    fig.tight_layout()
    return _save(fig, out / "knn_vs_probe")


def plot_search(ostudy: optuna.Study, out: Path) -> list[Path]:
    complete = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return []
    import warnings

    paths = []
    _plt()  # the Agg backend before optuna's plots load pyplot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is "experimental"
        ax = optuna.visualization.matplotlib.plot_optimization_history(ostudy)
        paths += _save(ax.figure, out / "optimization_history")
        try:
            ax = optuna.visualization.matplotlib.plot_param_importances(ostudy)
            paths += _save(ax.figure, out / "param_importances")
        except (ValueError, RuntimeError):  # too few trials or a single parameter value
            pass
    return paths


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1], metadata={"Date": None})
    _plt().close(fig)
    return paths


# ---------------------------------------------------------------- documents

def _md_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4f}"
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.itertuples(index=False))


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
    study_dir = (runio.RESULTS / name).resolve()
    storage_url = storage_url or default_url(study_dir)
    try:
        ostudy = optuna.load_study(study_name=name, storage=open_storage(storage_url, heartbeat_s=None))
    except KeyError:
        raise StudyError(f"no study '{name}' in {redact(storage_url)}; run it first (python -m harness.study "
                         f"{name.split('@')[0]}).") from None
    study_file = stored_study(name, study_dir)
    objective = ostudy.user_attrs.get("objective", study_file.objective)
    out = out_dir or study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    trials = trials_table(ostudy, study_dir)
    factors = factor_names(ostudy.get_trials(deepcopy=False)) or list(study_file.factors)
    for f in factors:
        if f not in trials:
            trials[f] = None
    curves = curves_table(trials, factors, study_dir)
    summary = summary_table(trials, factors) if len(trials) else pd.DataFrame()
    consistency = consistency_report.consistency_table(trials, factors, study_dir) if len(trials) else pd.DataFrame()
    diagnostics = (consistency_report.diagnostics_table(trials, factors, study_dir, objective)
                   if len(trials) and factors else pd.DataFrame())
    _write_tables(out, {"trials": trials, "curves": curves, "summary": summary, "consistency": consistency,
                        "diagnostics": diagnostics})

    skipped = not_run_levels(study_file, ostudy.user_attrs.get("signature", {}))
    plots: list[Path] = []
    if len(trials):
        plots += plot_objective(trials, factors, objective, study_file.reference, out, skipped)
        plots += plot_curves(curves, factors, out)
        plots += plot_knn_vs_probe(trials, factors, out)
        plots += consistency_report.plot_consistency(consistency, trials, factors, objective, out, _plt, _sns, _save)
        if study_file.race:
            plots += plot_interval_width(trials, study_file, factors, objective, out)
    if study_file.sampler == "tpe":
        plots += plot_search(ostudy, out)
    pngs = [p for p in plots if p.suffix == ".png"]
    md = _markdown(name, ostudy, study_file, objective, trials, factors, summary, pngs, study_dir, skipped,
                   consistency_report.markdown(diagnostics, _md_table))
    (out / "report.md").write_text(md)
    hints = (seed_hints(trials, study_file, factors, objective)
             if study_file.sampler == "grid" and len(trials) else [])
    if hints:  # what would decide an undecided fixed design (the study command prints it)
        (out / "hints.txt").write_text("\n".join(hints) + "\n")
    else:
        (out / "hints.txt").unlink(missing_ok=True)
    (out / "report.html").write_text(render_html(name, md, out))
    return out


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
              dictionary: list[str] = ()) -> str:
    verdicts = verdict(trials, factors, objective, study_file.direction == "maximize") if len(trials) else []
    starts = [t.datetime_start for t in ostudy.trials if t.datetime_start]
    ends = [t.datetime_complete for t in ostudy.trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() / 60 if starts and ends else float("nan")
    signature = ostudy.user_attrs.get("signature", {})
    counts = trials["state"].value_counts().to_dict() if len(trials) else {}
    md = [f"# Study `{name}`", "", study_file.description.strip(), "",
          f"- recipe: `{signature.get('recipe', study_file.recipe)}`; overrides: `{signature.get('overrides') or []}`",
          f"- objective: {objective} ({study_file.direction}); trials: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
          f"- machine: {machine_summary(trials, study_dir) if len(trials) else 'unknown'}",
          f"- wall time, first trial start to last trial end: {wall:.1f} min", "",
          "## Verdict", "", *[f"- {line}" for line in verdicts], "",
          *(["## Decisions", "", *decision_lines(trials, study_file, factors, objective), ""]
            if study_file.sampler == "grid" and len(trials) else []),
          "## Summary (per level)", "", _md_table(summary) if len(summary) else "(no trials)", "", *dictionary]
    if study_file.reference.get("values"):
        md += [f"Paper reference ({study_file.reference.get('source', '')}; {study_file.reference.get('metric', '')}) "
               "is drawn in its own panel: a different dataset and scale, never on our y-axis.", ""]
    md += _not_run_section(skipped, factors)
    md += _shared_section(trials)
    failed = trials[~trials["state"].isin(["COMPLETE"])] if len(trials) else trials
    if len(failed):
        md += ["## Trials not completed", "", _md_table(failed[["trial", "key", "state", "failure_reason"]]), ""]
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})\n" for p in pngs]
    return "\n".join(md) + "\n"


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
    return ["## Levels not run", "", _md_table(rows), ""]


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
            _md_table(shared[["trial", "key", "state", "probe_top1", "shared_from"]]), ""]


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; line-height: 1.4; }}
table {{ border-collapse: collapse; margin: 1em 0; display: block; max-width: 100%; overflow-x: auto; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
</style></head><body>
{body}
</body></html>
"""


def render_html(title: str, md: str, figures_dir: Path) -> str:
    """report.md as a page that stands alone: rendered by the `markdown` library, figures embedded."""
    import markdown

    def embed(match: re.Match) -> str:
        path = figures_dir / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", embed, md)
    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    return PAGE.format(title=html.escape(title), body=body)
