"""Two evaluation protocols of one study side by side (e.g. the fast probe it ran with and the
standard probe added by `python -m harness.study NAME --evaluate standard`): each level's mean under
each, the paired difference between them over seeds, and whether they rank the levels alike."""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness.planning.decide import interval
from harness.reporting.verdicts import points
from harness.run import evaluations, runio


def protocol_table(trials: pd.DataFrame, factors: list[str], study_dir) -> pd.DataFrame:
    """One row per completed trial and probe result: top-1 and top-5 as its result file says. A protocol
    the study's runs hold under several settings is named with each settings' key."""
    rows = []
    for _, t in trials[trials["state"] == "COMPLETE"].iterrows():
        if not isinstance(t.get("run_dir"), str):
            continue
        run_dir = study_dir / t["run_dir"]
        final = runio.read_status(run_dir).get("epoch")
        for result in evaluations.results(run_dir):
            epoch = result["settings"]["epoch"]  # a probe part-way names its epoch
            label = result["protocol"] + (f" @ epoch {epoch}" if epoch != final else "")
            rows.append({**{f: t[f] for f in factors}, "seed": t["seed"], "protocol": label,
                         "key": evaluations.key(result["settings"]), "top1": result["top1"], "top5": result.get("top5")})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    several = table.groupby("protocol")["key"].transform("nunique") > 1
    table.loc[several, "protocol"] = table["protocol"] + " " + table["key"]
    return table.drop(columns="key").drop_duplicates(subset=[*factors, "seed", "protocol"])


def markdown(table: pd.DataFrame, factors: list[str], objective: str, md_table) -> list[str]:
    """The levels under each protocol against the first (the fast probe of the last epoch), and how they
    differ; nothing with fewer than two."""
    if table.empty or table["protocol"].nunique() < 2:
        return []
    protocols = sorted(table["protocol"].unique(), key=lambda p: (p != "fast", p))  # the fast one first
    lines: list[str] = []
    for second in protocols[1:]:
        lines += _against(table, factors, objective, md_table, protocols[0], second)
    return lines


def _against(table: pd.DataFrame, factors: list[str], objective: str, md_table, first: str, second: str) -> list[str]:
    from scipy import stats

    wide = table.pivot_table(index=[*factors, "seed"], columns="protocol", values="top1").dropna(subset=[first, second])
    if wide.empty:
        return []
    pct, unit = points(objective)
    rows = []
    for level, part in wide.groupby(level=list(range(len(factors))), sort=True):
        diff, low, high = interval((part[second] - part[first]).to_numpy(dtype=float), 0.05)
        rows.append({**dict(zip(factors, level if isinstance(level, tuple) else (level,))), "seeds": len(part),
                     f"{first} top-1": f"{part[first].mean():.4f}", f"{second} top-1": f"{part[second].mean():.4f}",
                     f"{second} − {first}": f"{diff * pct:+.2f}{unit}" + (
                         f" [{low * pct:+.2f}, {high * pct:+.2f}]" if np.isfinite(low) else "")})
    means = wide.groupby(level=list(range(len(factors)))).mean()
    rho = stats.spearmanr(means[first], means[second]).statistic if len(means) > 1 else float("nan")
    best = {p: means[p].idxmax() for p in (first, second)}
    same = best[first] == best[second]
    return [f"The study's runs under two probe protocols, {first} and {second} (each run's own result files; the "
            "second added to finished runs without training them again). Differences are paired by seed, with "
            "95 % t-intervals.", "", md_table(pd.DataFrame(rows)), "",
            f"Rank correlation (Spearman) of the levels' means between the protocols: {rho:+.2f}; best level: "
            + (f"{best[first]} under both." if same else f"{best[first]} under {first}, {best[second]} under {second}."),
            ""]
