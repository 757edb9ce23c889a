"""What the tables say, as pure functions of them: the verdict per factor, the paired decision
table, seed hints, the raw-pixel floor."""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness.planning.decide import (
    EQUAL,
    SLIGHTLY_WORSE,
    UNDECIDED,
    WORSE,
    RaceSpec,
    classify,
    interval,
    level_label,
    race,
    seeds_to_decide,
    values_by_level,
)
from harness.planning.studyfile import Study

DEFAULT_MARGIN = 0.005  # a fixed design's decision table, when the study file names no `decide`


def rule_of(study_file: Study) -> RaceSpec:
    """The study's decision rule: its race, or a fixed design's one look at all its seeds."""
    return study_file.race or RaceSpec(len(study_file.seeds), len(study_file.seeds), DEFAULT_MARGIN, 0.95)


def verdict(trials: pd.DataFrame, factors: list[str], objective: str, maximize: bool = True,
            spec: RaceSpec | None = None) -> list[str]:
    """Best level per factor and how it compares with the runner-up, in the decision table's terms:
    the mean paired difference over common seeds, its t-interval at one comparison's share of the
    error rate, and the margin's words (`spec`: the study's decision rule; default: a fixed design
    with DEFAULT_MARGIN). With several factors, a factor's levels are compared within each
    combination of the others (the memory bank's K against the memory bank's, not pooled with MoCo's)."""
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=[objective])
    spec = spec or RaceSpec(2, 2, DEFAULT_MARGIN, 0.95)
    lines = []
    for factor in factors:
        others = [f for f in factors if f != factor]
        if not others:
            lines.append(_best_level(done, factor, objective, maximize, factor, spec))
            continue
        compared = False
        for held, part in done.groupby(others, sort=True):
            held = held if isinstance(held, tuple) else (held,)
            if part[factor].nunique() > 1:  # one level run at this combination: nothing to compare
                at = ", ".join(f"{f} = {v}" for f, v in zip(others, held))
                lines.append(_best_level(part, factor, objective, maximize, f"{factor} (at {at})", spec))
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


# The decision table's words for a comparison (best against another level), shared by the verdict.
WORDS = {WORSE: "better", SLIGHTLY_WORSE: "better, by less than the margin", EQUAL: "practically equal",
         UNDECIDED: "undecided"}


def _best_level(done: pd.DataFrame, factor: str, objective: str, maximize: bool, label: str, spec: RaceSpec) -> str:
    """The best level, and the runner-up compared with it as the decision table compares levels: paired
    by seed, a t-interval at the level one comparison gets (the error rate split over the factor's
    comparisons), the study's margin."""
    means = done.groupby(factor, sort=True)[objective].mean()
    if means.empty:
        return f"{label}: no completed trial yet."
    ranked = means.sort_values(ascending=not maximize).index.tolist()
    best = ranked[0]
    n_best = int((done[factor] == best).sum())
    text = f"{label}: best level {best} ({objective} {means[best]:.4f}, n={n_best})"
    if len(ranked) == 1:
        return text + "; no other level completed to compare with."
    second = ranked[1]
    by_seed = done[done[factor].isin([best, second])].pivot_table(index="seed", columns=factor, values=objective)
    paired = by_seed.dropna()
    if len(paired) < 2:
        return text + f"; runner-up {second} ({means[second]:.4f}); fewer than 2 seeds ran both: nothing to pair."
    sign = 1.0 if maximize else -1.0
    diffs = sign * (paired[second] - paired[best]).to_numpy(dtype=float)  # <= 0 on average: best minus the other
    alpha = spec.comparison_alpha(len(ranked))
    diff, low, high = interval(diffs, alpha)
    pct, unit = points(objective)
    return (text + f"; runner-up {second} ({means[second]:.4f}): {best} vs {second} "
            f"{-diff * pct:+.2f}{unit} [{-high * pct:+.2f}, {-low * pct:+.2f}], paired over {len(paired)} seeds at "
            f"{100 * (1 - alpha):.1f} %: {WORDS[classify(low, high, spec.margin)]} (margin ± {spec.margin * pct:g}{unit}).")


def points(objective: str) -> tuple[float, str]:
    """How the report writes differences of `objective`: top-1 accuracies in points (x 100, " pt")."""
    return (100.0, " pt") if objective.endswith("top1") else (1.0, "")


def race_of(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str):
    """The study's race (harness.planning.decide) replayed on its results; a fixed design is a race of one look."""
    spec = rule_of(study_file)
    values, diverged = race_values(trials, study_file, factors, objective)
    return spec, race(values, spec, study_file.direction == "maximize"), diverged


def race_values(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str):
    levels = list(dict.fromkeys(tuple(r) for r in trials[factors].itertuples(index=False)))
    rows = [{**r, objective: r[objective] if pd.notna(r[objective]) else None}
            for r in trials[[*factors, "seed", "state", objective]].to_dict("records")]
    return values_by_level(rows, factors, levels, objective, study_file.seeds)


def decision_lines(trials: pd.DataFrame, study_file: Study, factors: list[str], objective: str,
                   hints: list[str] | None = None) -> list[str]:
    """The decision table: each level against the best, paired by seed, with its interval."""
    spec, state, diverged = race_of(trials, study_file, factors, objective)
    if state.best is None:
        short = [f"{level_label(lvl, factors)} ({len(v)} of {spec.initial})" for lvl, v in
                 race_values(trials, study_file, factors, objective)[0].items() if len(v) < spec.initial]
        return [f"No decision yet: the first {spec.initial} seeds of every level are not all completed "
                f"(completed so far: {', '.join(short)})."]
    label = lambda level: level_label(level, factors)  # noqa: E731
    pct, unit = points(objective)
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
    for c in [*state.decisions.values(), *state.current.values()]:
        decision = WORDS[c.verdict]
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
    hints = seed_hints(trials, study_file, factors, objective) if hints is None else hints  # the report's, once
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
    pct, unit = points(objective)
    alpha = spec.plan(len(state.seeds))[0][2]
    lines, most = [], 0
    if min(c.n for c in state.current.values()) < 2:  # one seed: no spread to extrapolate from
        return ["One seed per level: no seed-to-seed spread to judge a difference by. Two or more seeds per level "
                "(`seeds: [0, 1]`) give the decisions an interval, and these hints a size."]
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
