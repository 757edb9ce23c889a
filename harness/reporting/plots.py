"""The report's figures (seaborn on matplotlib's Agg backend, deterministic SVG and PNG)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import optuna
import pandas as pd

from harness.planning.studyfile import Study
from harness.reporting.tables import ci95_half
from harness.reporting.verdicts import race_of, recorded_pixel_floor


def pyplot():
    """matplotlib's pyplot, loaded when a figure is drawn (a driver imports this module at its start
    and should not pay seconds of plotting imports until the report)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    matplotlib.rcParams["svg.hashsalt"] = "harness"  # the same figure, the same SVG: rebuilt reports diff clean
    import matplotlib.pyplot as plt

    return plt


def seaborn_module():
    pyplot()
    import seaborn as sns

    return sns


def plot_interval_width(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str,
                        out: Path) -> list[Path]:
    """How the comparisons' interval narrows with seeds (adaptive studies)."""
    spec, state, _ = race_of(trials, study_file, factors, objective)
    if len(state.widths) < 2:
        return []
    fig, ax = pyplot().subplots(figsize=(5.5, 4))
    n, width = zip(*state.widths)
    ax.plot(n, width, marker="o", label="mean interval width of the levels still compared")
    ax.axhline(2 * spec.margin, color="gray", ls=":", label="2 x margin: narrower can show 'equal'")
    ax.set(xlabel="seeds per level", ylabel=f"interval width ({objective})", yscale="log")
    ax.set_title("Decision intervals vs seeds", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / "interval_width")


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
                   skipped: Sequence[tuple[dict, str]] = ()) -> list[Path]:
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
    fig, axes = pyplot().subplots(1, 2 if has_ref else 1, figsize=(11 if has_ref else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    done = df[df["state"] == "COMPLETE"].dropna(subset=[objective])
    hue_values = sorted(df[hue].dropna().unique(), key=str) if hue else [None]
    palette = dict(zip(hue_values, seaborn_module().color_palette("deep", len(hue_values))))
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
    return save_figure(fig, out / "objective")


def plot_curves(curves: pd.DataFrame, factors: list[str], out: Path) -> list[Path]:
    if curves.empty:
        return []
    df = curves.copy()
    df["level"] = df[factors].astype(str).agg(", ".join, axis=1)
    # Pretext accuracy beside the kNN monitor: a pretext task solved early while kNN lags is the
    # signature of BatchNorm "cheating" that Shuffle BN prevents (He et al., Sec. 3.3).
    metrics = [m for m in ("loss", "pretext_acc", "knn_top1") if m in df and df[m].notna().any()]
    fig, axes = pyplot().subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        seaborn_module().lineplot(data=df, x="epoch", y=metric, hue="level", errorbar="sd", marker="o", ax=ax)
        ax.set_title(f"{metric} vs epoch (band: ± std over seeds)")
        ax.legend(title=", ".join(factors), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / "curves")


def plot_knn_vs_probe(trials: pd.DataFrame, factors: list[str], out: Path) -> list[Path]:
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=["knn_top1", "probe_top1"])
    if done.empty:
        return []
    df = done.copy()
    df["level"] = df[factors].astype(str).agg(", ".join, axis=1)
    fig, ax = pyplot().subplots(figsize=(5.5, 4.2))
    seaborn_module().scatterplot(data=df, x="knn_top1", y="probe_top1", hue="level", s=50, ax=ax)
    ax.set_title("kNN monitor vs linear probe (final)")
    fig.tight_layout()
    return save_figure(fig, out / "knn_vs_probe")


def plot_search(ostudy: optuna.Study, out: Path) -> list[Path]:
    complete = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return []
    import warnings

    paths = []
    pyplot()  # the Agg backend before optuna's plots load pyplot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is "experimental"
        ax = optuna.visualization.matplotlib.plot_optimization_history(ostudy)
        paths += save_figure(ax.figure, out / "optimization_history")
        try:
            ax = optuna.visualization.matplotlib.plot_param_importances(ostudy)
            paths += save_figure(ax.figure, out / "param_importances")
        except (ValueError, RuntimeError):  # too few trials or a single parameter value
            pass
    return paths


def save_figure(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1], metadata={"Date": None})
    pyplot().close(fig)
    return paths


def plot_interaction(trials: pd.DataFrame, factors: list[str], objective: str, oldest: pd.DataFrame,
                     out: Path) -> list[Path]:
    """A two-factor grid: the objective's heatmap (mean over seeds, n per cell), the interaction plot
    (the second factor on its axis, one line per level of the first: parallel lines, no interaction),
    and key consistency at the oldest key against the second factor per level of the first."""
    first, second = factors
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=[objective])
    if not len(done):
        return []
    plt = pyplot()
    panels = 3 if len(oldest) else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    cells = done.groupby([first, second])[objective].agg(["mean", "count"]).reset_index()
    mean = cells.pivot(index=first, columns=second, values="mean").sort_index(ascending=False)
    count = cells.pivot(index=first, columns=second, values="count").reindex_like(mean)
    ax = axes[0]
    image = ax.imshow(mean.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    low, high = float(mean.min().min()), float(mean.max().max())
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            if pd.notna(mean.iat[i, j]):
                light = (mean.iat[i, j] - low) > 0.6 * (high - low)  # viridis turns yellow: dark text there
                ax.text(j, i, f"{mean.iat[i, j]:.4f}\nn={int(count.iat[i, j])}", ha="center", va="center",
                        fontsize=8, color="black" if light else "white")
    ax.set_xticks(range(mean.shape[1]), [f"{v:g}" if isinstance(v, float) else str(v) for v in mean.columns])
    ax.set_yticks(range(mean.shape[0]), [f"{v:g}" if isinstance(v, float) else str(v) for v in mean.index])
    ax.set(xlabel=second, ylabel=first)
    ax.set_title(f"{objective}, mean over seeds", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)

    ax = axes[1]
    for level, part in done.groupby(first, sort=True):
        grouped = part.groupby(second)[objective]
        stats = grouped.mean().reset_index()
        half = grouped.apply(ci95_half).to_numpy()
        x, _, _ = _axis(second, stats[second])
        ax.errorbar(x, stats[objective], yerr=half, marker="o", capsize=3, label=f"{first} = {level}")
    _, label, scale = _axis(second, done[second])
    _apply_scale(ax, scale, done[second], second)
    ax.set(xlabel=label, ylabel=objective)
    ax.set_title("Interaction plot (mean, 95 % interval)", fontsize=10)
    ax.legend(fontsize=8)

    if panels == 3:
        ax = axes[2]
        for level, part in oldest.groupby(first, sort=True):
            stats = part.groupby(second)["key_consistency"].mean().reset_index()
            x, _, _ = _axis(second, stats[second])
            ax.plot(x, stats["key_consistency"], marker="o", label=f"{first} = {level}")
        _apply_scale(ax, scale, oldest[second], second)
        ax.set(xlabel=label, ylabel="key consistency at the oldest key (cosine)")
        ax.set_title("Consistency of the dictionary's oldest keys", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / "interaction")
