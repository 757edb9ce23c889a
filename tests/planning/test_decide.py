"""Adaptive replication: the decision logic is a function of a results table, checked by hand and
by hundreds of simulated studies with known level means and seed noise."""
import numpy as np
import pytest
from scipy import stats
from timing import hang_s

from harness.planning.decide import (
    EQUAL,
    SCENARIOS,
    SLIGHTLY_WORSE,
    UNDECIDED,
    WORSE,
    RaceSpec,
    classify,
    error_rates,
    interval,
    race,
    seeds_to_decide,
)
from harness.planning.spending import SPENDING, boundaries, increments, nominal_levels

SPEC = RaceSpec(initial=2, max=8, margin=0.005, confidence=0.95)


def test_interval_is_the_t_interval_of_the_paired_differences():
    d = np.array([0.01, 0.012, 0.008, 0.011])
    mean, low, high = interval(d, 0.01)
    ref = stats.t.interval(0.99, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert mean == pytest.approx(d.mean()) and (low, high) == pytest.approx(ref)
    assert SPEC.comparison_alpha(5) == pytest.approx(0.05 / 4)  # split over 4 comparisons with the best
    assert [level for _, _, level in RaceSpec(2, 8, 0.005, spending="bonferroni").plan(5)] == \
        pytest.approx([0.05 / (7 * 4)] * 7)  # the first rule: evenly over 7 looks too


@pytest.mark.parametrize("kind", SPENDING)
def test_the_looks_spend_exactly_the_comparisons_error_rate_and_the_boundaries_cross_that_often(kind):
    """Per-look increments sum to alpha; and with no difference (known variance, a Brownian path of
    seed sums) the first crossing of look k's boundary happens with look k's increment -- checked by
    400,000 simulated paths, so the correlation between looks is what the boundaries use."""
    looks, alpha = (2, 3, 4, 5, 6), 0.0125
    spend = increments(kind, looks, alpha)
    assert sum(spend) == pytest.approx(alpha) and all(a >= 0 for a in spend)
    c = np.array(boundaries(kind, looks, alpha))
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(400_000, len(looks))) * np.sqrt(np.diff([0, *looks]))
    crossed = np.abs(np.cumsum(steps, axis=1)) / np.sqrt(looks) >= c
    first = np.where(crossed.any(axis=1), crossed.argmax(axis=1), -1)
    observed = [np.mean(first == k) for k in range(len(looks))]
    if kind == "bonferroni":  # no correlation used: each look crosses less often than it could
        assert all(o <= a + 4e-4 for o, a in zip(observed, spend)) and sum(observed) < alpha * 0.8
    else:
        assert observed == pytest.approx(spend, abs=4e-4)  # ~3 standard errors at the largest increment
    if kind == "obrien-fleming":  # little early, most at the last look
        assert spend[0] < 1e-4 and spend[-1] > alpha / 2 and nominal_levels(kind, looks, alpha)[-1] > alpha / 2
    if kind == "pocock":  # about equal boundaries
        assert max(c) - min(c) < 0.2


def test_an_interval_below_zero_inside_the_margin_is_worse_by_less_than_the_margin():
    assert classify(-0.004, -0.001, 0.005) == SLIGHTLY_WORSE
    assert classify(-0.009, -0.001, 0.005) == WORSE
    assert classify(-0.004, +0.001, 0.005) == EQUAL
    assert classify(-0.009, +0.001, 0.005) == UNDECIDED


def test_race_decides_from_paired_seeds_and_asks_for_one_more_seed_where_undecided():
    shared = np.array([0.0, 0.02, -0.02, 0.01, -0.01, 0.0, 0.015, -0.015])  # seed effects, common to all levels
    wiggle = (-1.0) ** np.arange(8)  # each level's own noise, seed by seed
    values = {"a": list(0.85 + shared), "b": list(0.80 + shared + 0.003 * wiggle),
              "c": list(0.8495 + shared + 1e-4 * wiggle), "d": list(0.845 + shared + 0.004 * wiggle)}
    state = race({k: v[:2] for k, v in values.items()}, SPEC)
    assert state.best == "a" and not state.done and state.decisions == {}  # 2 seeds: nothing is certain
    assert state.seeds == {"a": 3, "b": 3, "c": 3, "d": 3}
    state = race({k: v[:4] for k, v in values.items()}, SPEC)
    # b: 5 points under a on every seed (paired: the seed effects cancel) -> worse at 3 or 4 seeds;
    assert state.decisions["b"].verdict == WORSE and state.decisions["b"].diff == pytest.approx(-0.05, abs=2e-3)
    assert state.decisions["b"].best == "a" and state.decisions["b"].n <= 4
    # c: 0.05 points under a, tightly -> practically equal; d: noisier than a -> undecided for now.
    assert state.decisions["c"].verdict == EQUAL
    assert "d" not in state.decisions and state.current["d"].verdict == UNDECIDED
    assert state.seeds["a"] == state.seeds["d"] == 5 and state.seeds["b"] == state.decisions["b"].n
    # Only what completed counts, so a killed driver replays the same race from the storage.
    again = race({k: (v[:5] if k in ("a", "d") else v[:state.seeds[k]]) for k, v in values.items()}, SPEC)
    assert again.decisions["b"] == state.decisions["b"] and again.decisions["c"] == state.decisions["c"]


def test_race_stops_at_max_seeds_with_the_undecided_ones_named():
    rng = np.random.default_rng(1)
    values = {lvl: list(0.85 + rng.normal(0, 0.01, 8)) for lvl in "ab"}  # equal means, noisy: stays undecided
    state = race(values, SPEC)
    assert state.done and state.seeds == {"a": 8, "b": 8}
    other = "b" if state.best == "a" else "a"
    assert state.current[other].verdict == UNDECIDED and state.current[other].n == 8
    assert [n for n, _ in state.widths] == list(range(2, 9))  # the interval's width at every look
    assert state.widths[-1][1] < state.widths[1][1]


@pytest.mark.parametrize("spending", SPENDING)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_simulated_races_keep_the_error_rate_and_save_trials_when_levels_are_far_apart(name, spending):
    spec = RaceSpec(2, 8, 0.005, 0.95, spending)
    rates = error_rates(spec=spec, runs=300, **SCENARIOS[name])
    alpha = 1 - spec.confidence
    assert rates["truly_best_declared_worse"] <= alpha
    assert rates["clearly_worse_declared_equal"] <= alpha
    if name == "well separated":
        assert rates["fraction_of_fixed"] <= 0.6 and rates["clearly_worse_declared_worse"] >= 0.95


def test_spending_at_the_last_look_settles_more_close_calls_than_the_even_split():
    """The close call (levels 0.3 and 0.8 points under the best): the same simulated races decide the
    worse levels more often under O'Brien-Fleming-type spending than under the even split."""
    rates = {kind: error_rates(spec=RaceSpec(2, 8, 0.005, 0.95, kind), runs=300, **SCENARIOS["close call"])
             for kind in ("obrien-fleming", "bonferroni")}
    assert rates["obrien-fleming"]["clearly_worse_declared_worse"] > rates["bonferroni"]["clearly_worse_declared_worse"] + 0.03


@pytest.mark.parametrize("diff, sd", [(-0.0025, 0.002), (-0.02, 0.01), (0.0, 0.003), (-0.006, 0.004)])
def test_the_seed_hint_names_a_count_that_decides_at_least_80_percent_of_the_time(diff, sd):
    """A fixed design with the hinted seeds, simulated 20,000 times with paired differences of that mean
    and spread, classified as the report classifies (t-interval at the comparison's level): decided
    at least 80 % of the time (within 3 Monte Carlo standard errors)."""
    margin, alpha = 0.005, 0.0125
    n = seeds_to_decide(diff, sd, margin, alpha)
    assert n is not None and n >= 2
    rng = np.random.default_rng(1)
    d = rng.normal(diff, sd, size=(20_000, n))
    mean, half = d.mean(axis=1), stats.t.ppf(1 - alpha / 2, n - 1) * d.std(axis=1, ddof=1) / np.sqrt(n)
    decided = (mean + half < 0) | (mean - half > 0) | ((mean - half > -margin) & (mean + half < margin))
    assert decided.mean() >= 0.8 - 3 * np.sqrt(0.16 / 20_000)


RACE_STUDY = """\
description: a 2-level race, killed during a round and between rounds
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=256, data.test_subset=128, optim.batch_size=64, optim.epochs=1, moco.queue_size=256,
            moco.bn_splits=4, eval.pixel_floor=false, eval.knn_every=0]
factors: {moco.momentum: [0.9, 0.99]}
seeds: {initial: 2, max: 3}
decide: {margin: 0.0}
retries: 0
"""


def test_adaptive_seeds_refuse_worker_mode_before_anything_runs(tmp_path, study_cli):
    study = tmp_path / "race.yaml"
    study.write_text(RACE_STUDY)
    proc = study_cli(tmp_path / "results", str(study), "--executor", "local", "--workers", "2")
    assert proc.returncode == 2 and "adaptive seeds need the driver's rounds" in proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_killed_driver_resumes_the_race_without_losing_or_repeating_a_trial(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import optuna

    root = Path(__file__).resolve().parents[2]
    study = tmp_path / "race.yaml"
    study.write_text(RACE_STUDY)
    results = tmp_path / "results"
    env = {**os.environ, "HARNESS_RESULTS": str(results)}
    cmd = [sys.executable, "-m", "harness.study", str(study), "--executor", "local", "--parallel", "2",
           "--poll", "0.3", "--no-report"]
    storage = f"sqlite:///{results / 'race' / 'study.db'}"

    def complete() -> int:
        try:
            trials = optuna.load_study(study_name="race", storage=storage).get_trials()
        except Exception:  # not created yet
            return 0
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    for until in (1, 4):  # killed during the first round, then as the first round completes
        driver = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + hang_s()
        while complete() < until and driver.poll() is None:  # (a race may also end at its first look)
            assert time.monotonic() < deadline
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    final = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=hang_s())
    assert final.returncode == 0, final.stderr[-3000:]
    assert "[study race] race over: best " in final.stdout  # the race says where it stands
    all_trials = optuna.load_study(study_name="race", storage=storage).get_trials()
    # A driver killed between asking for a trial and recording its job leaves a trial it cannot follow:
    # failed as lost, and its point asked again (no retry spent: the study allows none); if the job had
    # started, the new one waits for it instead of failing on the busy run directory.
    lost = [t for t in all_trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.user_attrs.get("never_ran") for t in lost), [t.user_attrs for t in lost]
    trials = [t for t in all_trials if t.state == optuna.trial.TrialState.COMPLETE]
    keys = [t.user_attrs["key"] for t in trials]
    assert len(keys) == len(set(keys))  # nothing trained twice
    values = {m: [next(t.value for t in trials if t.params == {"moco.momentum": m, "seed": s})
                  for s in range(3) if f"momentum={m},seed={s}" in keys] for m in (0.9, 0.99)}
    state = race(values, RaceSpec(2, 3, 0.0, spending="obrien-fleming"))  # the rule the driver raced by
    assert state.done and {m: len(v) for m, v in values.items()} == state.seeds  # exactly what the race asks


def test_the_dry_run_of_a_race_prints_its_spending_plan(tmp_path, study_cli):
    """`--dry-run` of the committed race: per look, the error rate it spends (summing to the
    comparison's share) and the interval's level; a spending the study file names is the one shown."""
    import re

    proc = study_cli(tmp_path, "momentum_race", "--dry-run", "--executor", "local")
    assert proc.returncode == 0, proc.stderr
    assert "spending plan (obrien-fleming): error rate 0.05 over 4 comparison(s) with the best, 0.0125 each" in proc.stdout
    spent = [float(x) for x in re.findall(r"look at \d seeds: spends ([0-9.e-]+) of it", proc.stdout)]
    assert len(spent) == 5 and sum(spent) == pytest.approx(0.0125, rel=1e-2) and spent == sorted(spent)
    study = tmp_path / "pocock.yaml"
    study.write_text(RACE_STUDY.replace("decide: {margin: 0.0}", "decide: {margin: 0.0, spending: pocock}"))
    assert "spending plan (pocock)" in study_cli(tmp_path, str(study), "--dry-run", "--executor", "local").stdout
    study.write_text(RACE_STUDY.replace("decide: {margin: 0.0}", "decide: {margin: 0.0, spending: even}"))
    wrong = study_cli(tmp_path, str(study), "--dry-run", "--executor", "local")
    assert wrong.returncode == 2 and "decide.spending" in wrong.stderr and "obrien-fleming" in wrong.stderr
