"""The report's dictionary section: key consistency against key age per level, beside accuracy
(harness.training.diagnostics measures it in every run; this reads the runs' metrics.jsonl).

Runs made before the diagnostics existed (shared or committed) carry none: they show as "not
measured", never as a value.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.reporting.tables import run_moco_config
from harness.run import runio
from harness.run.mechanisms import MECHANISMS

DIAGNOSTICS = ("key_consistency", "alignment", "uniformity", "effective_rank")
NOT_MEASURED = "not measured"


def _last_diagnostics(study_dir: Path, run_dir: str | None) -> dict:
    """A run's diagnostics ({} if none): key consistency averaged over every measured epoch (at the
    end of a cosine schedule the encoder barely moves and any m looks consistent; the average is
    what the dictionary was during training), the embedding's alignment, uniformity and rank at the
    last measured epoch (what training produced)."""
    if not run_dir:
        return {}
    epochs = [r for r in runio.read_jsonl(study_dir / run_dir / "metrics.jsonl")
              if r.get("kind") == "epoch" and any(k in r for k in DIAGNOSTICS)]
    if not epochs:
        return {}
    out = {k: epochs[-1][k] for k in DIAGNOSTICS[1:] if k in epochs[-1]}
    out["epochs measured"] = len(epochs)
    measured = [r for r in epochs if "key_consistency_ages" in r]
    if measured:
        out["key_consistency"] = sum(r["key_consistency"] for r in measured) / len(measured)
        by_age: dict = {}
        for r in measured:
            for age, value in r["key_consistency_ages"]:
                by_age.setdefault(age, []).append(value)
        out["key_consistency_ages"] = [[age, sum(v) / len(v)] for age, v in sorted(by_age.items())]
    return out


def run_diagnostics(trials: pd.DataFrame, study_dir: Path) -> dict:
    """Each completed run's diagnostics (run_dir -> record), its metrics read once for both tables."""
    done = trials[trials["state"] == "COMPLETE"] if len(trials) else trials
    return {r: _last_diagnostics(study_dir, r) for r in done.get("run_dir", []) if isinstance(r, str)}


def consistency_table(trials: pd.DataFrame, factors: list[str], records: dict) -> pd.DataFrame:
    """One row per (trial, key age): the cosine between stored and fresh keys, averaged over the run's
    measured epochs (`records`: run_diagnostics)."""
    rows = []
    for _, t in trials[trials["state"] == "COMPLETE"].iterrows():
        record = records.get(t.get("run_dir"), {})
        for age, value in record.get("key_consistency_ages", []):
            rows.append({"trial": t["trial"], **{f: t[f] for f in factors}, "seed": t["seed"],
                         "epochs": record["epochs measured"], "key_age_steps": age, "key_consistency": value})
    return pd.DataFrame(rows, columns=["trial", *factors, "seed", "epochs", "key_age_steps", "key_consistency"])


def diagnostics_table(trials: pd.DataFrame, factors: list[str], records: dict, study_dir: Path,
                      objective: str) -> pd.DataFrame:
    """Per level: the objective's mean and the diagnostics' means over the seeds that measured them
    (key consistency at the oldest sampled age), and how many seeds did."""
    done = trials[trials["state"] == "COMPLETE"]
    rows = []
    for level, part in done.groupby(factors, sort=True, dropna=False):
        level = level if isinstance(level, tuple) else (level,)
        measured = [r for r in (records.get(d, {}) for d in part["run_dir"]) if r]
        row = {**dict(zip(factors, level)), f"{objective}_mean": part[objective].astype(float).mean(),
               "seeds measured": f"{len(measured)} of {len(part)}"}
        if "moco.key_encoder" not in factors:
            row["moco.key_encoder"] = run_moco_config(study_dir, part["run_dir"].iloc[0]).get("key_encoder")
        for key in DIAGNOSTICS:
            values = [r[key] for r in measured if r.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, md_table) -> list[str]:
    """The report's section: what was measured, the table with 'not measured' where nothing was."""
    if table.empty:
        return []
    shown = table.copy()
    if "moco.key_encoder" in shown and shown["moco.key_encoder"].isna().all():
        shown = shown.drop(columns="moco.key_encoder")  # the runs' configs are not at hand (shared elsewhere)
    for key in DIAGNOSTICS:
        shown[key] = shown[key].astype(object).map(lambda v: NOT_MEASURED if v is None or pd.isna(v)
                                                   else f"{float(v):.4f}")
    if "moco.key_encoder" in shown:  # keys made by the encoder in use: nothing to measure
        by_construction = shown["moco.key_encoder"].map(
            lambda name: name in MECHANISMS and MECHANISMS[name].consistent_by_construction)
        shown.loc[by_construction.astype(bool), "key_consistency"] = "1 by construction"
    return ["## Dictionary consistency", "",
            "How consistent the dictionary's keys are with the key encoder as it is now (harness.training.diagnostics): "
            "for queue blocks of several ages the keys are made again from the same views by the current key "
            "encoder, and `key_consistency` is their mean cosine with the stored keys at the oldest sampled age "
            "(1 = the key encoder has not changed since), averaged over the epochs measured (late in a cosine "
            "schedule the encoder barely moves and every dictionary looks consistent). Memory bank: an entry against the feature of the view "
            "that last updated it. End-to-end: consistent by construction, not measured. Alignment and "
            "uniformity (Wang & Isola 2020; lower is better for both) and the backbone features' effective rank: "
            "at each run's last measured epoch. Runs made before the diagnostics existed show as "
            f"'{NOT_MEASURED}'.", "", md_table(shown), ""]


def plot_consistency(table: pd.DataFrame, trials: pd.DataFrame, factors: list[str], objective: str, out: Path,
                     plt, sns, save) -> list[Path]:
    """Left: key consistency against key age (steps), one curve per level, mean over seeds. Right, beside
    it: each run's objective against its consistency at the oldest sampled age."""
    if table.empty:
        return []
    df = table.copy()
    df["level"] = df[factors].astype(str).agg(", ".join, axis=1)
    fig, (left, right) = plt().subplots(1, 2, figsize=(11, 4.2))
    sns().lineplot(data=df, x="key_age_steps", y="key_consistency", hue="level", marker="o", errorbar="sd", ax=left)
    left.set(xlabel="key age (training steps since the key was made)", xscale="log",
             ylabel="cosine(stored key, same view now)")
    left.set_title("Dictionary consistency vs key age, mean over epochs (band: ± std over seeds)", fontsize=10)
    left.legend(title=", ".join(factors), fontsize=8)
    oldest = df.sort_values("key_age_steps").groupby("trial").tail(1)
    runs = oldest.merge(trials[["trial", objective]], on="trial").dropna(subset=[objective])
    sns().scatterplot(data=runs, x="key_consistency", y=objective, hue="level", s=60, ax=right, legend=False)
    right.set(xlabel="key consistency at the oldest sampled age (mean over epochs)", ylabel=f"{objective} (final)")
    right.set_title("Accuracy vs consistency, per run", fontsize=10)
    fig.tight_layout()
    return save(fig, out / "consistency")
