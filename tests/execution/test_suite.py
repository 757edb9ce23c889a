"""Suites (`python -m harness.study SUITE`): studies run as one ablation, shared runs trained once,
one report. Real training (one tiny trial), real Optuna storages, the local executor."""
import fcntl
import gc
from pathlib import Path

import optuna
import pytest

SMALL = ('"model.tiny_widths=[8,16,32]", data.train_subset=512, data.test_subset=256, optim.batch_size=64, optim.epochs=1, '
         "moco.bn_splits=4, "
         "eval.pixel_floor=false, eval.knn_every=0, eval.probe_epochs=5, runtime.log_every=4")
TINY = f"recipe: fmnist-tiny\noverrides: [{SMALL}, moco.queue_size=256]\nseeds: [0]\nretries: 0\n"


def write_suite(folder: Path) -> Path:
    """Two studies whose only points are the same run (K = 256 is the overrides' K; m = 0.99 the
    recipe's), a third with a level the suite leaves out, and the suite."""
    (folder / "by_m.yaml").write_text("description: momentum\nfactors: {moco.momentum: [0.99]}\n" + TINY)
    (folder / "by_k.yaml").write_text("description: queue\nfactors: {moco.queue_size: [256]}\n"
                                      "reference: {source: paper, metric: top-1, values: [{moco.queue_size: 256, "
                                      "value: 50.0}]}\n" + TINY.replace(", moco.queue_size=256", ""))
    (folder / "by_t.yaml").write_text("description: temperature\nfactors: {moco.temperature: [0.1, 0.5]}\n" + TINY)
    suite = folder / "ablation.yaml"
    suite.write_text(f"description: all of it\nsuite:\n  - {folder / 'by_m.yaml'}\n  - {folder / 'by_k.yaml'}\n"
                     f"  - {{study: {folder / 'by_t.yaml'}, factors: {{moco.temperature: [0.1]}}}}\n")
    return suite


def trials(results: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}").get_trials()


@pytest.mark.slow
def test_a_suite_trains_each_shared_run_once_and_reports_on_one_page(tmp_path, study_cli):
    suite = write_suite(tmp_path)
    results = tmp_path / "results"
    plan = study_cli(results, str(suite), "--dry-run", "--executor", "local")
    assert plan.returncode == 0, plan.stderr
    assert "suite ablation: 3 trials in 3 studies; 1 distinct runs, 0 of them already finished: 1 to train, " \
           "2 trials shared." in plan.stdout
    assert not results.exists()  # a dry run leaves nothing behind

    gc.disable()  # a driver kept alive by a reference cycle must not keep its lock: it is released, not collected
    try:
        proc = study_cli(results, str(suite), "--executor", "local")
        assert proc.returncode == 0, proc.stderr
        for member in ("by_m", "by_k", "by_t"):
            with open(results / "ablation" / member / "driver.lock") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a driver holds it
    finally:
        gc.enable()
    (first,) = trials(results, "ablation/by_m")
    (second,) = trials(results, "ablation/by_k")
    (third,) = trials(results, "ablation/by_t")
    assert "shared_from" not in first.user_attrs and first.user_attrs["job_id"]  # trained once, here
    for t in (second, third):
        assert t.user_attrs["shared_from"] == "ablation/by_m/runs/momentum=0.99,seed=0"
        assert t.value == first.value and t.params.get("seed") == 0
    assert len(list((results / "ablation" / "by_m" / "jobs").glob("*_submitted.pkl"))) == 1
    assert not (results / "ablation" / "by_k" / "jobs").exists() or \
        not list((results / "ablation" / "by_k" / "jobs").glob("*_submitted.pkl"))

    report = results / "ablation" / "report"
    cost = (report / "report.md").read_text()
    assert "3 trials; 1 runs trained, 2 shared between the suite's studies and 0 with studies outside it" in cost
    assert {"by_m-objective.png", "by_k-objective.png", "by_t-objective.png"} <= {p.name for p in report.iterdir()}
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Paper: paper; top-1" in html
    assert "temperature (levels narrowed by suite ablation)" in html
    import pandas as pd

    rows = pd.read_csv(report / "cost.csv").set_index("study")
    assert rows.loc["suite", "trained"] == 1 and rows.loc["suite", "shared within the suite"] == 2
    assert rows.loc["by_m", "CPU-hours"] > 0 and rows.loc["by_k", "CPU-hours"] == 0

    again = study_cli(results, str(suite), "--executor", "local", "--no-report")  # nothing left: nothing rerun
    assert again.returncode == 0 and len(trials(results, "ablation/by_k")) == 1

    import shutil

    from harness import report as report_cli

    committed = pd.read_csv(report / "cost.csv")
    shutil.rmtree(report)
    assert report_cli.main([str(suite)]) == 0  # `python -m harness.report SUITE` rebuilds it from the storages
    pd.testing.assert_frame_equal(pd.read_csv(report / "cost.csv"), committed)
    assert (report / "report.html").read_text().count("data:image/png;base64,") == 3


def test_a_wrong_suite_fails_before_anything_runs(tmp_path, study_cli):
    suite = write_suite(tmp_path)
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("suite: [nosuch_study]\n", "unknown study 'nosuch_study'"),
        (f"suite: [{{study: {tmp_path / 'by_t.yaml'}, factors: {{moco.temperature: [0.3]}}}}]\n",
         "factors.moco.temperature: a non-empty subset of by_t's levels [0.1, 0.5] is required; not among them: [0.3]"),
        (f"suite: [{{study: {tmp_path / 'by_t.yaml'}, factors: {{moco.momentum: [0.9]}}}}]\n",
         "factors.moco.momentum: not a factor of by_t"),
        (f"suite: [{tmp_path / 'by_m.yaml'}, {tmp_path / 'by_m.yaml'}]\n", "by_m is listed twice"),
        (f"suite: [{suite}]\n", "is a suite; a suite lists studies"),
        ("suite: []\n", "suite: a non-empty list"),
        ("suite: [smoke]\nstudies: [x]\n", "unknown suite key 'studies'. Did you mean 'suite'?"),
    ]:
        bad.write_text(text)
        proc = study_cli(tmp_path / "results", str(bad), "--executor", "local")
        assert proc.returncode == 2 and message in proc.stderr, (text, proc.stderr)
        assert not (tmp_path / "results").exists()
