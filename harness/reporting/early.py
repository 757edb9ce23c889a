"""How early the answer was known: epoch by epoch, does the kNN monitor order the levels as the final
probe does, and would the paired decisions (harness.planning.decide) on the monitor's values have been
the same? The earliest epoch from which both hold is evidence for how far pruning on the monitor, and
shorter ablations, can be trusted — within this schedule: at epoch e of a long schedule the learning
rate has not decayed as an e-epoch run's would, so a point of it is not a shorter run.
"""
from __future__ import annotations

import pandas as pd

from harness.planning.decide import RaceState, level_label, race
from harness.planning.studyfile import Study
from harness.reporting.verdicts import race_values, rule_of

MONITOR = "knn_top1"
SHOWN = 20  # epochs listed on the page at most (every one is in agreement.csv)


def _verdicts(state: RaceState) -> dict:
    return {level: c.verdict for level, c in {**state.decisions, **state.current}.items()}


def _means(values: dict) -> dict:
    """Each level's mean over the seeds every level has (the paired comparison's seeds)."""
    n = min((len(v) for v in values.values()), default=0)
    return {level: sum(v[:n]) / n for level, v in values.items()} if n else {}


def _order(means: dict, maximize: bool) -> list:
    return sorted(means, key=lambda level: means[level], reverse=maximize)


def agreement(trials: pd.DataFrame, curves: pd.DataFrame, study_file: Study, factors: list[str],
              objective: str) -> pd.DataFrame:
    """Per epoch: Spearman's rank correlation of the levels' mean monitor value with their mean final
    objective, and whether the order, the best level and the paired decisions are the final ones."""
    if objective == MONITOR or curves.empty or MONITOR not in curves or trials.empty:
        return pd.DataFrame()
    from scipy import stats

    spec, maximize = rule_of(study_file), study_file.direction == "maximize"
    final_values, _ = race_values(trials, study_file, factors, objective)
    final_state = race(final_values, spec, maximize)
    final_means = _means(final_values)
    if final_state.best is None or len(final_means) < 2:
        return pd.DataFrame()
    rows = []
    keys = [*factors, "seed"]
    for epoch, at in curves.dropna(subset=[MONITOR]).groupby("epoch", sort=True):
        monitor = trials[[*keys, "state"]].merge(
            at[[*keys, MONITOR]], on=keys, how="left").rename(columns={MONITOR: objective})
        values, _ = race_values(monitor, study_file, factors, objective)
        means = _means(values)
        if set(means) != set(final_means):  # a level without this epoch (pruned, diverged, not reached)
            continue
        levels = list(final_means)
        rho = stats.spearmanr([means[lv] for lv in levels], [final_means[lv] for lv in levels]).statistic
        state = race(values, spec, maximize)
        rows.append({"epoch": int(epoch), "levels": len(levels), "spearman": float(rho),
                     "order": _text(_order(means, maximize), factors),
                     "same_order": _order(means, maximize) == _order(final_means, maximize),
                     "same_best": state.best == final_state.best,
                     "same_decisions": state.best == final_state.best and _verdicts(state) == _verdicts(final_state)})
    table = pd.DataFrame(rows)
    table.attrs["final_order"] = _text(_order(final_means, maximize), factors)
    return table


def _text(order: list, factors: list[str]) -> str:
    """`0.99 > 0.999`; with several factors, `(moco.momentum, moco.queue_size): (0.99, 4096) > ...`."""
    if len(factors) == 1:
        return " > ".join(level_label(level, factors) for level in order)
    return f"({', '.join(factors)}): " + " > ".join(f"({', '.join(map(str, level))})" for level in order)


def earliest(table: pd.DataFrame) -> int | None:
    """The first epoch from which the order and the decisions match the final probe's at every later epoch."""
    if table.empty:
        return None
    found = None
    for row in table.sort_values("epoch", ascending=False).itertuples():
        if not (row.same_order and row.same_decisions):
            break
        found = int(row.epoch)
    return found


def markdown(table: pd.DataFrame, objective: str, epochs: int, md_table) -> list[str]:
    if table.empty:
        return []
    first = earliest(table)
    if first is not None:
        said = (f"From epoch **{first}** of {epochs} on, the kNN monitor orders the levels as the final {objective} "
                "does, and its paired decisions are the final ones.")
    else:
        high = table["spearman"].round(9) >= 0.9  # 9/10 from Spearman's formula is 0.8999... in floating point
        settled = next((int(e) for e in table["epoch"][high] if high[table["epoch"] >= e].all()), None)
        last = "at the last epoch too, the order differs" if not table.iloc[-1].same_order else \
            "the decisions differ at the last epoch"
        said = (f"At no epoch from which it lasts do the monitor's order and paired decisions match the final "
                f"{objective}'s ({last})"
                + (f"; its rank correlation with the final {objective} stays at +0.90 or more from epoch "
                   f"**{settled}** on." if settled is not None else ".")
                + f" The final {objective} orders the levels {table.attrs.get('final_order', '?')}; the monitor at the "
                  f"last epoch {table.iloc[-1].order}.")
    step = max(1, -(-len(table) // SHOWN))
    shown = table.iloc[::step]
    if shown.iloc[-1].epoch != table.iloc[-1].epoch:
        shown = pd.concat([shown, table.iloc[[-1]]])
    page = shown.assign(spearman=shown["spearman"].map(lambda r: f"{r:+.2f}"),
                        **{c: shown[c].map({True: "yes", False: "no"}) for c in ("same_order", "same_best", "same_decisions")})
    page = page.rename(columns={"spearman": "rank correlation (Spearman)", "same_order": "same order",
                                "same_best": "same best", "same_decisions": "same decisions"}).drop(columns=["levels", "order"])
    return [said, "",
            f"Per epoch, the {table['levels'].iloc[0]} levels' mean kNN monitor against their mean final {objective} "
            "(the same seeds, the same paired decision rule). A point of this schedule is not a shorter run: at "
            f"epoch e the learning rate has not decayed as an e-epoch run's would. All epochs: `agreement.csv`.", "",
            md_table(page)]
