"""Adaptive replication: which levels need another seed, decided from paired seeds with intervals
that stay valid when the harness looks again after every added seed.

A race over the levels of one factor (after F-Race / Hoeffding races, made paired and sequential):
seed s means the same initial weights, data order and augmentation at every level, so levels are
compared seed by seed, through the paired differences d_s = value(level, s) - value(best, s).

Method: the study's error rate alpha = 1 - confidence is split (Bonferroni) over the comparisons with
the best (levels - 1); each comparison spends its share over the planned looks (initial .. max
seeds) by a spending function (harness.planning.spending: O'Brien-Fleming-type by default, Pocock, or the
even Bonferroni split), and look k's interval is a t-interval of the mean paired difference at that
look's nominal level. Any wrong decision, over the whole race, then happens with probability about
alpha or less whichever seeds the race stops at (the simulation below measures it).

At each look every level still racing is classified against the current best:
  worse           the interval of its difference lies below 0 and reaches past -margin
  slightly worse  the interval lies below 0 and inside (-margin, 0): worse, by less than the margin
  equal           the interval lies inside (-margin, +margin) and holds 0: practically equal
  undecided       otherwise; it and the best get one more seed
Decisions are final. The race ends when only the best is left undecided, or at `max` seeds. The
state is a pure function of the results table (replayed look by look), so a driver killed at any
point resumes the race exactly.

`python -m harness.decide` runs the simulation that checks the error rates and the savings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from harness.planning.spending import increments, nominal_levels

WORSE, SLIGHTLY_WORSE, EQUAL, UNDECIDED, BEST = "worse", "slightly worse", "equal", "undecided", "best"
DECIDED_WORSE = (WORSE, SLIGHTLY_WORSE)


@dataclass(frozen=True)
class RaceSpec:
    initial: int  # seeds every level gets
    max: int  # seeds a level gets at most
    margin: float  # |difference| below which two levels are practically equal (objective units)
    confidence: float = 0.95
    spending: str = "obrien-fleming"  # how a comparison's error rate is spread over the looks (SPENDING)

    @property
    def looks(self) -> int:
        return self.max - self.initial + 1

    def comparison_alpha(self, levels: int) -> float:
        """One comparison's share of the error rate (Bonferroni over the comparisons with the best)."""
        return (1.0 - self.confidence) / max(levels - 1, 1)

    def plan(self, levels: int) -> list[tuple[int, float, float]]:
        """(seeds, error rate spent, two-sided level of the interval) of each look of one comparison."""
        return _plan(self, levels)

    def level(self, n: int, levels: int) -> float:
        """The two-sided error of the interval at the look with n seeds."""
        return self.plan(levels)[n - self.initial][2]


@lru_cache(maxsize=256)
def _plan(spec: RaceSpec, levels: int) -> list[tuple[int, float, float]]:
    looks = tuple(range(spec.initial, spec.max + 1))
    alpha = spec.comparison_alpha(levels)
    return list(zip(looks, increments(spec.spending, looks, alpha), nominal_levels(spec.spending, looks, alpha)))


@dataclass(frozen=True)
class Comparison:
    level: object
    best: object  # the level it was compared with
    n: int  # paired seeds
    diff: float  # mean of value(level) - value(best)
    low: float
    high: float
    verdict: str


@dataclass
class RaceState:
    seeds: dict  # level -> how many seeds (the first ones) it needs: decided levels, those they were decided on
    decisions: dict = field(default_factory=dict)  # level -> final Comparison
    current: dict = field(default_factory=dict)  # level -> Comparison at the latest look (undecided ones)
    best: object = None
    done: bool = False
    widths: list = field(default_factory=list)  # (n, mean interval width of the levels compared at n)


@lru_cache(maxsize=4096)
def _t(q: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


def interval(diffs: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """Mean and two-sided (1 - alpha) t-interval of paired differences (n >= 2)."""
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:
        return mean, -math.inf, math.inf
    half = _t(1.0 - alpha / 2.0, n - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def seeds_to_decide(diff: float, sd: float, margin: float, alpha: float, power: float = 0.8,
                    most: int = 200) -> int | None:
    """About how many paired seeds a fixed design needs to decide a comparison with probability
    `power`, if the mean paired difference is `diff` and its seed-to-seed spread `sd`: the fewest n
    whose t-interval at level 1 - alpha excludes 0, or lies inside +-margin, that often (noncentral t;
    the equal side by the two one-sided tests' bound). None: more than `most`."""
    from scipy import stats

    d = abs(diff)
    if sd <= 0:
        return 2
    for n in range(2, most + 1):
        df, root = n - 1, math.sqrt(n)
        t = _t(1.0 - alpha / 2.0, df)
        differ = stats.nct.sf(t, df, d * root / sd)
        equal = stats.nct.cdf(-t, df, (d - margin) * root / sd) + stats.nct.sf(t, df, (d + margin) * root / sd) - 1
        if max(differ, equal) >= power:
            return n
    return None


def classify(low: float, high: float, margin: float) -> str:
    if high < 0:
        return SLIGHTLY_WORSE if low > -margin else WORSE
    if low > -margin and high < margin:
        return EQUAL
    return UNDECIDED


def race(values: dict, spec: RaceSpec, maximize: bool = True) -> RaceState:
    """Replay the race on `values` ({level: [value of seed 0, seed 1, ...]}, seeds in order, each list
    as long as the seeds that completed) and say how many seeds each level needs now."""
    sign = 1.0 if maximize else -1.0
    levels = list(values)
    active, state = list(levels), RaceState(seeds={})
    n = spec.initial
    while True:
        if any(len(values[lvl]) < n for lvl in active):  # this look's seeds are not all in yet
            state.seeds = {lvl: (n if lvl in active else state.decisions[lvl].n) for lvl in levels}
            return state
        data = {lvl: sign * np.asarray(values[lvl][:n], dtype=float) for lvl in active}
        best = max(active, key=lambda lvl: (data[lvl].mean(), -levels.index(lvl)))
        state.best, state.current = best, {}
        widths = []
        for lvl in active:
            if lvl == best:
                continue
            mean, low, high = interval(data[lvl] - data[best], spec.level(n, len(levels)))
            verdict = classify(low, high, spec.margin)
            lo, hi = sorted((sign * low, sign * high))
            comparison = Comparison(lvl, best, n, sign * mean, lo, hi, verdict)
            widths.append(high - low)
            if verdict == UNDECIDED:
                state.current[lvl] = comparison
            else:
                state.decisions[lvl] = comparison
        if widths:
            state.widths.append((n, float(np.mean(widths))))
        active = [lvl for lvl in active if lvl == best or lvl not in state.decisions]
        if active == [best] or n >= spec.max:
            state.done = True
            state.seeds = {lvl: (n if lvl in active else state.decisions[lvl].n) for lvl in levels}
            return state
        n += 1


def summary(state: RaceState, label=str) -> str:
    """Where the race stands, in one line (the driver prints it whenever it changes)."""
    if state.best is None:
        return ""
    parts = [f"best {label(state.best)}"]
    for verdict, name in ((WORSE, "worse"), (SLIGHTLY_WORSE, "worse by less than the margin"),
                          (EQUAL, "practically equal")):
        decided = [f"{label(lvl)} ({c.diff:+.4f} [{c.low:+.4f}, {c.high:+.4f}], n={c.n})"
                   for lvl, c in state.decisions.items() if c.verdict == verdict]
        if decided:
            parts.append(f"{name}: {', '.join(decided)}")
    if state.done:
        undecided = [f"{label(lvl)} ({c.diff:+.4f} [{c.low:+.4f}, {c.high:+.4f}])" for lvl, c in state.current.items()]
        return "race over: " + "; ".join(parts + ([f"undecided at max seeds: {', '.join(undecided)}"] if undecided else []))
    racing = [lvl for lvl in state.seeds if lvl not in state.decisions]
    return (f"race: {'; '.join(parts)}; undecided: {', '.join(label(lvl) for lvl in state.current) or 'none'}; "
            f"next: {max(state.seeds[lvl] for lvl in racing)} seeds for {', '.join(label(lvl) for lvl in racing)}")


# ---------------------------------------------------------------- simulation

def simulate(means: list[float], noise: float, shared: float, spec: RaceSpec, rng: np.random.Generator):
    """One race on synthetic results: value(level, seed) = mean + shared seed effect + own noise.
    Returns the final state and the trials spent."""
    seeds_max = spec.max
    common = rng.normal(0.0, shared, seeds_max)
    table = {i: list(m + common + rng.normal(0.0, noise, seeds_max)) for i, m in enumerate(means)}
    got = {i: table[i][:spec.initial] for i in table}
    while True:
        state = race(got, spec)
        if state.done:
            return state, sum(len(v) for v in got.values())
        got = {i: table[i][:state.seeds[i]] for i in table}


def error_rates(means: list[float], noise: float, shared: float, spec: RaceSpec, runs: int, seed: int = 0) -> dict:
    """Over `runs` simulated races: how often the truly best level is declared worse, how often a
    level worse than the best by more than the margin is declared practically equal or worse by less
    than the margin, and the trials spent against the fixed design at max seeds."""
    rng = np.random.default_rng(seed)
    truly_best = int(np.argmax(means))
    clearly_worse = [i for i, m in enumerate(means) if means[truly_best] - m > spec.margin]
    best_declared_worse = worse_missed = worse_declared = 0
    spent = []
    for _ in range(runs):
        state, trials = simulate(means, noise, shared, spec, rng)
        spent.append(trials)
        verdicts = {lvl: c.verdict for lvl, c in state.decisions.items()}
        best_declared_worse += verdicts.get(truly_best) in DECIDED_WORSE
        worse_missed += any(verdicts.get(i) in (EQUAL, SLIGHTLY_WORSE) for i in clearly_worse)
        worse_declared += sum(verdicts.get(i) == WORSE for i in clearly_worse)
    fixed = len(means) * spec.max
    return {"runs": runs, "levels": len(means), "alpha": round(1 - spec.confidence, 4),
            "truly_best_declared_worse": best_declared_worse / runs,
            "clearly_worse_declared_equal": worse_missed / runs,
            "clearly_worse_declared_worse": worse_declared / max(runs * len(clearly_worse), 1),
            "trials_mean": float(np.mean(spent)), "fixed_design_trials": fixed,
            "fraction_of_fixed": float(np.mean(spent)) / fixed}


SCENARIOS: dict[str, dict[str, Any]] = {  # objective units (top-1); noise and shared seed effect from the momentum sweep's scale
    "well separated": dict(means=[0.790, 0.833, 0.854, 0.820, 0.805], noise=0.003, shared=0.003),
    "close call": dict(means=[0.790, 0.833, 0.854, 0.851, 0.846], noise=0.003, shared=0.003),
    "all equal": dict(means=[0.85] * 5, noise=0.003, shared=0.003),
    "just past the margin": dict(means=[0.854, 0.8485, 0.8485, 0.8485, 0.8485], noise=0.003, shared=0.003),
}






# ---------------------------------------------------------------- from a study's results

def level_of(params: dict, factors: list[str]) -> tuple:
    return tuple(params.get(f) for f in factors)


def level_label(level: tuple, factors: list[str]) -> str:
    return ", ".join(f"{f}={v}" for f, v in zip(factors, level)) if len(factors) > 1 else str(level[0])


def values_by_level(rows: list[dict], factors: list[str], levels: list[tuple], objective: str,
                    seeds: list[int]) -> tuple[dict, list[tuple]]:
    """Completed results as the race reads them: per level, the values of seeds[0], seeds[1], ... up
    to the first seed not completed. Levels with a diverged run leave the race (the paper's 'fail').
    `rows`: dicts with the factors, 'seed', 'state' and the objective."""
    done: dict[tuple, dict[int, float]] = {}
    diverged: list[tuple] = []
    for row in rows:
        level = level_of(row, factors)
        if row["state"] == "DIVERGED" and level not in diverged:
            diverged.append(level)
        elif row["state"] == "COMPLETE" and row.get(objective) is not None:
            done.setdefault(level, {})[row["seed"]] = float(row[objective])
    values = {}
    for level in levels:
        if level in diverged:
            continue
        got = done.get(level, {})
        prefix = []
        for seed in seeds:
            if seed not in got:
                break
            prefix.append(got[seed])
        values[level] = prefix
    return values, diverged
