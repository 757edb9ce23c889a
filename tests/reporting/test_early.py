"""How early the answer was known (harness.reporting.early): the kNN monitor's order and paired
decisions, epoch by epoch, against the final probe's."""
import pandas as pd
import yaml

from harness.planning.studyfile import parse_study
from harness.reporting import early


def _study(tmp_path):
    return parse_study("early", tmp_path / "early.yaml", yaml.safe_load(
        "description: x\nrecipe: fmnist-tiny\nfactors: {moco.momentum: [0.9, 0.99, 0.999]}\nseeds: [0, 1, 2]\n"))


def test_the_earliest_epoch_from_which_the_monitor_agrees_for_good(tmp_path):
    """Final probe: 0.99 > 0.999 > 0.9, 0.9 clearly worse. The monitor ranks 0.9 first at epoch 1,
    agrees at epoch 2, swaps 0.99 and 0.999 at epoch 3, then agrees from epoch 4 on: the answer is 4,
    not 2 (an agreement that does not last is not an answer)."""
    probe = {0.9: 0.70, 0.99: 0.85, 0.999: 0.83}
    monitor = {1: {0.9: 0.60, 0.99: 0.55, 0.999: 0.50}, 2: {0.9: 0.50, 0.99: 0.70, 0.999: 0.65},
               3: {0.9: 0.55, 0.99: 0.70, 0.999: 0.72}, 4: {0.9: 0.56, 0.99: 0.74, 0.999: 0.72},
               5: {0.9: 0.57, 0.99: 0.76, 0.999: 0.73}}
    noise = [0.0, 0.004, -0.003]  # shared by the levels on a seed: what pairing removes
    trials = pd.DataFrame([{"moco.momentum": m, "seed": s, "state": "COMPLETE", "probe_top1": v + noise[s]}
                           for m, v in probe.items() for s in range(3)])
    curves = pd.DataFrame([{"moco.momentum": m, "seed": s, "state": "COMPLETE", "epoch": e, "knn_top1": v + noise[s]}
                           for e, levels in monitor.items() for m, v in levels.items() for s in range(3)])
    table = early.agreement(trials, curves, _study(tmp_path), ["moco.momentum"], "probe_top1")
    assert table["same_order"].tolist() == [False, True, False, True, True]
    assert table["same_best"].tolist() == [False, True, False, True, True]
    assert early.earliest(table) == 4
    assert table["spearman"].iloc[0] == -0.5 and table["spearman"].iloc[-1] == 1.0
    lines = early.markdown(table, "probe_top1", 5, lambda df: df.to_string())
    assert lines[0].startswith("From epoch **4** of 5 on, the kNN monitor orders the levels as the final probe_top1")


def test_a_monitor_that_never_settles_says_which_levels_it_swaps(tmp_path):
    trials = pd.DataFrame([{"moco.momentum": m, "seed": s, "state": "COMPLETE", "probe_top1": v + 0.001 * s}
                           for m, v in {0.9: 0.70, 0.99: 0.85, 0.999: 0.84}.items() for s in range(3)])
    curves = pd.DataFrame([{"moco.momentum": m, "seed": s, "state": "COMPLETE", "epoch": e, "knn_top1": v + 0.001 * s}
                           for e in (1, 2) for m, v in {0.9: 0.5, 0.99: 0.70, 0.999: 0.71}.items() for s in range(3)])
    table = early.agreement(trials, curves, _study(tmp_path), ["moco.momentum"], "probe_top1")
    assert early.earliest(table) is None
    said = early.markdown(table, "probe_top1", 2, lambda df: df.to_string())[0]
    assert "stays at +0.90 or more from epoch **1** on" not in said  # Spearman 0.5 here
    assert said.endswith("The final probe_top1 orders the levels 0.99 > 0.999 > 0.9; the monitor at the last epoch "
                         "0.999 > 0.99 > 0.9.")
