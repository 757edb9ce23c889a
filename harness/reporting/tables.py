"""Tables from a study's storage and run directories: one row per trial, curves, level summaries."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from harness.run import runio
from harness.run import trial_record as record
from harness.run.mechanisms import DEFAULT, MECHANISMS
from harness.run.outcome import state_label


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
        run_dir = _relative(study_dir, a.get(record.RUN_DIR))
        row = {"trial": t.number, "key": a.get(record.KEY), **{f: t.params.get(f) for f in factors},
               "seed": t.params.get("seed", a.get("seed")), "state": state,
               "failure_reason": a.get(record.FAILURE_REASON), "probe_top1": a.get("probe_top1"),
               "probe_top5": a.get("probe_top5"), "pixel_floor_top1": a.get("pixel_floor_top1"),
               "knn_top1": a.get("knn_top1"), "final_loss": a.get("final_loss"),
               "chance_loss": chance_loss(study_dir, run_dir), "epochs": a.get("epochs"),
               "gpu_hours": a.get(record.GPU_HOURS), "hours": a.get(record.HOURS), "job_id": a.get(record.JOB_ID),
               "host": a.get("host"), "identity": a.get(record.IDENTITY), "run_dir": run_dir,
               "shared_from": a.get(record.SHARED_FROM), "shared_hours": a.get(record.SHARED_HOURS)}
        if t.state == optuna.trial.TrialState.RUNNING and run_dir:
            epochs = [r for r in runio.read_jsonl(study_dir / run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
            if epochs:
                row.update(epochs=epochs[-1]["epoch"], knn_top1=epochs[-1].get("knn_top1"))
        rows.append(row)
    return pd.DataFrame(rows)


def _relative(study_dir: Path, run_dir: str | None) -> str | None:
    """The run directory relative to the study directory. Older format: storages written before run directories
    were recorded relative hold absolute paths: a study moved since (a committed example) is found by
    the path's runs/<key> tail. Can go when the committed examples' storages are rewritten."""
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


def run_moco_config(study_dir: Path, run_dir: str | None) -> dict:
    """The `moco` section of a run's config.yaml ({} when the run has none)."""
    if not run_dir or not (study_dir / run_dir / "config.yaml").exists():
        return {}
    return runio.read_config(study_dir / run_dir).get("moco") or {}


def chance_loss(study_dir: Path, run_dir: str | None) -> float | None:
    """ln(K + 1): the InfoNCE loss of an encoder that cannot tell its positive from the K negatives."""
    moco = run_moco_config(study_dir, run_dir)
    mech = MECHANISMS.get(moco.get("key_encoder", DEFAULT)) if moco else None
    if mech is None or mech.k_is_batch:  # negatives: the rest of the batch, not K
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
                             "lr": r.get("lr"), "pretext_acc": r.get("pretext_acc")})
    # pretext_acc (how often the positive key wins) last: scripts that read the earlier columns keep them
    return pd.DataFrame(rows, columns=["trial", *factors, "seed", "state", "epoch", "loss", "knn_top1", "lr", "pretext_acc"])


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


METRICS = ("probe_top1", "knn_top1")


def page_summary(summary: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """The summary as the report page shows it: labels a reader knows, each metric in one column (mean
    and its 95 % interval, or mean ± std), what did not complete in one; summary.csv keeps every column."""
    def interval(row, metric: str) -> str:
        mean, low, high = row.get(f"{metric}_mean"), row.get(f"{metric}_ci95_low"), row.get(f"{metric}_ci95_high")
        if mean is None or pd.isna(mean):
            return "-"
        return f"{mean:.4f}" + (f" [{low:.4f}, {high:.4f}]" if pd.notna(low) and pd.notna(high) else "")

    def spread(row, metric: str) -> str:
        mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
        if mean is None or pd.isna(mean):
            return "-"
        return f"{mean:.4f}" + (f" ± {std:.4f}" if pd.notna(std) else "")

    gpus = summary["gpu_hours"].fillna(0).gt(0).any()
    rows = []
    for _, row in summary.iterrows():
        missing = ", ".join(f"{int(row[k])} {k}" for k in ("failed", "diverged", "pruned", "running")
                            if k in row and row[k])
        shown = {f: row[f] for f in factors}
        shown.update({"n": int(row["n"]), "probe top-1, mean [95 % interval]": interval(row, "probe_top1"),
                      "kNN top-1, mean ± std": spread(row, "knn_top1"),
                      "final loss": f"{row['final_loss_mean']:.3f}" if pd.notna(row.get("final_loss_mean")) else "-",
                      "not completed": missing})
        if gpus:
            shown["GPU-hours"] = f"{row['gpu_hours']:.2f}"
        rows.append(shown)
    return pd.DataFrame(rows)
