"""Two factors together: does the effect of one depend on the level of the other?

MoCo's argument (He et al. 2019, Sec. 3.1-3.2) is about an interaction: a dictionary must be large
*and* consistent, so a larger queue K should pay off only when the momentum m keeps its older keys
consistent. A grid over two factors answers it with **interaction contrasts**: for two levels a1, a2
of the first factor and b1, b2 of the second, the difference of differences

    dd = (y[a2, b2] - y[a2, b1]) - (y[a1, b2] - y[a1, b1])

(how much more the second factor's step b1 -> b2 gains at a2 than at a1), computed seed by seed (one
seed's four runs share their initial weights and data order, so seed noise common to them cancels),
with a t-interval at the study's error rate split (Bonferroni) over the contrasts. Pure functions of
the trials table; the plots live beside the others (harness.reporting.plots).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from harness.planning.decide import interval, seeds_to_decide

INTERACTION = "interaction"  # the effect of one factor depends on the other's level
NO_INTERACTION = "no interaction"  # the interval lies inside +-margin
UNDECIDED = "undecided"


@dataclass(frozen=True)
class Contrast:
    """One 2 x 2 interaction contrast: `second`'s step lo -> hi at `first` = hi, minus at `first` = lo."""
    first: str
    first_levels: tuple  # (lo, hi)
    second: str
    second_levels: tuple  # (lo, hi)
    diff: float  # mean over seeds of the difference of differences
    low: float  # its interval at level 1 - alpha
    high: float
    n: int  # seeds with all four runs completed
    alpha: float  # the error rate of this contrast's interval (the study's, split over the contrasts)
    decision: str  # INTERACTION | NO_INTERACTION | UNDECIDED
    seeds_needed: int | None  # UNDECIDED: about how many seeds would decide (None: more than 200)


def is_two_factor_grid(trials: pd.DataFrame, factors: list[str]) -> bool:
    """Two factors, each with at least two levels completed: a grid the contrasts can read."""
    done = trials[trials["state"] == "COMPLETE"] if len(trials) else trials
    return len(factors) == 2 and all(f in done and done[f].nunique() >= 2 for f in factors)


def cell_values(trials: pd.DataFrame, factors: list[str], objective: str) -> dict:
    """{(level of first, level of second): {seed: value}} of the completed runs."""
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=[objective])
    cells: dict = {}
    for row in done[[*factors, "seed", objective]].itertuples(index=False):
        cells.setdefault((row[0], row[1]), {})[int(row[2])] = float(row[3])
    return cells


def paired_differences(cells: dict, a: tuple, b: tuple) -> np.ndarray:
    """dd per seed for levels a = (a1, a2) of the first factor and b = (b1, b2) of the second, over
    the seeds whose four runs all completed (paired: the same seed in every cell)."""
    corners = [cells.get((ai, bj), {}) for ai in a for bj in b]  # (a1,b1) (a1,b2) (a2,b1) (a2,b2)
    seeds = sorted(set.intersection(*(set(c) for c in corners))) if all(corners) else []
    y11, y12, y21, y22 = ([c[s] for s in seeds] for c in corners)
    return (np.array(y22) - np.array(y21)) - (np.array(y12) - np.array(y11))


def contrasts(trials: pd.DataFrame, factors: list[str], objective: str, confidence: float = 0.95,
              margin: float = 0.005) -> list[Contrast]:
    """Every 2 x 2 contrast of the grid's levels (each factor's levels in sorted order), decided at
    the error rate 1 - confidence split over the contrasts. A contrast needs 2 seeds with all four runs."""
    first, second = factors
    cells = cell_values(trials, factors, objective)
    levels_a = sorted({a for a, _ in cells})
    levels_b = sorted({b for _, b in cells})
    pairs = [(a, b) for a in combinations(levels_a, 2) for b in combinations(levels_b, 2)]
    alpha = (1.0 - confidence) / max(len(pairs), 1)
    out = []
    for a, b in pairs:
        dd = paired_differences(cells, a, b)
        if len(dd) < 2:
            continue
        mean, low, high = interval(dd, alpha)
        if low > 0 or high < 0:
            decision, needed = INTERACTION, None
        elif -margin < low and high < margin:
            decision, needed = NO_INTERACTION, None
        else:
            decision = UNDECIDED
            needed = seeds_to_decide(mean, float(np.std(dd, ddof=1)), margin, alpha)
        out.append(Contrast(first, a, second, b, mean, low, high, len(dd), alpha, decision, needed))
    return out


def contrast_table(found: list[Contrast], scale: float = 100.0) -> pd.DataFrame:
    """The contrasts as a table (differences in points when `scale` is 100, as top-1 in the report)."""
    rows = [{"first": c.first, "first_levels": f"{c.first_levels[0]} -> {c.first_levels[1]}",
             "second": c.second, "second_levels": f"{c.second_levels[0]} -> {c.second_levels[1]}",
             "difference_of_differences": c.diff * scale, "low": c.low * scale, "high": c.high * scale,
             "n": c.n, "confidence": 1.0 - c.alpha, "decision": c.decision, "seeds_needed": c.seeds_needed}
            for c in found]
    return pd.DataFrame(rows, columns=["first", "first_levels", "second", "second_levels",
                                       "difference_of_differences", "low", "high", "n", "confidence",
                                       "decision", "seeds_needed"])


def short_name(factor: str) -> str:
    return factor.rsplit(".", 1)[-1]


def contrast_lines(found: list[Contrast], margin: float, confidence: float, unit: str = " pt",
                   scale: float = 100.0) -> list[str]:
    """The report's interaction section: the rule, then one line per contrast with its decision."""
    if not found:
        return ["No interaction contrast yet: it needs two seeds whose four runs (two levels of each factor) "
                "all completed."]
    c0 = found[0]
    a, b = short_name(c0.first), short_name(c0.second)
    lines = [f"Interaction contrasts, paired by seed: for two levels of each factor, how much more the step in "
             f"{b} gains at the higher {a} than at the lower one (the difference of differences), with t-intervals "
             f"at the error rate {1 - confidence:.2g} split (Bonferroni) over the grid's "
             f"{round((1 - confidence) / c0.alpha)} contrast(s): each at "
             f"{100 * (1 - c0.alpha):.2f} %. No interaction: the interval inside ± {margin * scale:g}{unit}.", "",
             "| contrast | difference of differences | interval | n | decision |", "|---|---|---|---|---|"]
    for c in found:
        what = (f"{b} {c.second_levels[0]} -> {c.second_levels[1]}: at {a} = {c.first_levels[1]} "
                f"vs at {a} = {c.first_levels[0]}")
        if c.decision == INTERACTION:
            more = "more" if c.diff > 0 else "less"
            decision = (f"the effect of {b} depends on {a}: it gains {abs(c.diff) * scale:.2f}{unit} {more} at "
                        f"{a} = {c.first_levels[1]}")
        elif c.decision == NO_INTERACTION:
            decision = "no interaction beyond the margin"
        else:
            seeds = (f"about {c.seeds_needed} seeds would decide" if c.seeds_needed
                     else "more than 200 seeds would be needed")
            decision = f"undecided at {c.n} seeds; {seeds}"
        lines.append(f"| {what} | {c.diff * scale:+.2f}{unit} | [{c.low * scale:+.2f}, {c.high * scale:+.2f}] | "
                     f"{c.n} | {decision} |")
    return lines


def oldest_key_consistency(consistency: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """Per run, the key consistency at its oldest measured key age (from the consistency table), for
    the plot of consistency against the second factor, one line per level of the first."""
    if not len(consistency):
        return pd.DataFrame(columns=[*factors, "seed", "key_age_steps", "key_consistency"])
    oldest = consistency.sort_values("key_age_steps").groupby("trial", as_index=False).last()
    return oldest[[*factors, "seed", "key_age_steps", "key_consistency"]]
