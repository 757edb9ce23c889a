"""Interaction contrasts of a two-factor grid (harness.reporting.interaction), on constructed tables:
a planted interaction is decided, none planted is not, and the seeds are paired."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.reporting import interaction
from harness.reporting.interaction import INTERACTION, NO_INTERACTION, UNDECIDED

FACTORS = ["moco.momentum", "moco.queue_size"]
M, K = [0.9, 0.99], [256, 1024, 4096]


def grid(effect_of_k_at_high_m: float, seed_sd: float, noise_sd: float, seeds: int = 6, rng_seed: int = 0):
    """probe_top1 of an m x K grid: 0.85 + a seed's own offset (shared by its six runs, as a seed's
    initial weights and data order are) + K's effect (0 at m = 0.9, `effect_of_k_at_high_m` per K step at
    m = 0.99) + independent noise per run."""
    rng = np.random.default_rng(rng_seed)
    offsets = rng.normal(0, seed_sd, seeds)
    rows = []
    for m in M:
        for step, k in enumerate(K):
            for s in range(seeds):
                value = 0.85 + offsets[s] + (effect_of_k_at_high_m * step if m == 0.99 else 0.0)
                rows.append({"moco.momentum": m, "moco.queue_size": k, "seed": s, "state": "COMPLETE",
                             "probe_top1": value + rng.normal(0, noise_sd)})
    return pd.DataFrame(rows)


def test_a_planted_interaction_is_decided_with_its_sign():
    trials = grid(effect_of_k_at_high_m=0.01, seed_sd=0.02, noise_sd=0.001)
    assert interaction.is_two_factor_grid(trials, FACTORS)
    found = interaction.contrasts(trials, FACTORS, "probe_top1")
    assert len(found) == 3  # one pair of m levels x three pairs of K levels
    assert all(c.decision == INTERACTION and c.diff > 0 for c in found)
    widest = {(c.second_levels): c for c in found}[(256, 4096)]
    assert widest.diff == pytest.approx(0.02, abs=0.003)  # two K steps of 1 point at m = 0.99 only
    lines = interaction.contrast_lines(found, 0.005, 0.95)
    assert "the effect of queue_size depends on momentum" in lines[-1]


def test_no_planted_interaction_is_called_one_at_most_at_the_error_rate():
    """The three contrasts of a grid share the error rate 0.05 (Bonferroni): over 200 grids without an
    interaction, at most about 5 % show one anywhere (binomial sd 1.5 %: 9 % is 2.7 sd above)."""
    wrong = 0
    for rng_seed in range(200):
        trials = grid(effect_of_k_at_high_m=0.0, seed_sd=0.02, noise_sd=0.0005, rng_seed=rng_seed)
        decisions = {c.decision for c in interaction.contrasts(trials, FACTORS, "probe_top1")}
        wrong += INTERACTION in decisions
        assert decisions & {NO_INTERACTION}  # 6 seeds at 0.05 pt of noise: inside the 0.5 pt margin
    assert wrong <= 18
    noisy = grid(effect_of_k_at_high_m=0.0, seed_sd=0.02, noise_sd=0.01, seeds=3)
    undecided = [c for c in interaction.contrasts(noisy, FACTORS, "probe_top1") if c.decision == UNDECIDED]
    assert undecided and all(c.seeds_needed is None or c.seeds_needed > 3 for c in undecided)


def test_the_interval_is_the_paired_one():
    """Seed offsets (2 points) dwarf the interaction (1 point): paired by seed they cancel, the interval
    is the t-interval of the per-seed differences of differences and the interaction is decided; an
    analysis that ignores the pairing (each cell's mean, their variances added) cannot decide it."""
    trials = grid(effect_of_k_at_high_m=0.01, seed_sd=0.02, noise_sd=0.001, seeds=4, rng_seed=3)
    found = {c.second_levels: c for c in interaction.contrasts(trials, FACTORS, "probe_top1")}
    c = found[(256, 1024)]
    cell = {(m, k): g.sort_values("seed")["probe_top1"].to_numpy() for (m, k), g in trials.groupby(FACTORS)}
    dd = (cell[0.99, 1024] - cell[0.99, 256]) - (cell[0.9, 1024] - cell[0.9, 256])
    half = stats.t.ppf(1 - c.alpha / 2, len(dd) - 1) * dd.std(ddof=1) / np.sqrt(len(dd))
    assert c.alpha == pytest.approx(0.05 / 3) and c.n == 4
    assert (c.low, c.high) == pytest.approx((dd.mean() - half, dd.mean() + half))
    assert c.decision == INTERACTION
    unpaired_half = stats.t.ppf(1 - c.alpha / 2, 4 * (len(dd) - 1)) * np.sqrt(
        sum(cell[key].var(ddof=1) / len(dd) for key in cell if key[1] in (256, 1024)))
    assert unpaired_half > 5 * half and dd.mean() - unpaired_half < 0  # unpaired: undecided


def test_a_seed_missing_from_one_cell_leaves_the_contrast_to_the_seeds_all_four_cells_have():
    trials = grid(effect_of_k_at_high_m=0.01, seed_sd=0.02, noise_sd=0.001, seeds=4)
    trials.loc[(trials["moco.momentum"] == 0.9) & (trials["moco.queue_size"] == 256) & (trials["seed"] == 2),
               "state"] = "FAIL"
    found = {c.second_levels: c for c in interaction.contrasts(trials, FACTORS, "probe_top1")}
    assert found[(256, 1024)].n == 3 and found[(1024, 4096)].n == 4
