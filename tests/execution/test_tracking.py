"""MLflow relayed by the driver (harness.execution.tracking), against a real `mlflow server` that is
stopped for part of the study: the study completes, the server catches up, no point is lost or
doubled, and the jobs never get the tracking URI."""
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from timing import hang_s, wait_until

from harness.execution import tracking
from harness.run import curves, runio

ROOT = Path(__file__).resolve().parents[2]
STUDY = """\
description: 2 trials relayed to MLflow, paced so that the server's outage falls mid-training
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=256, data.test_subset=256, optim.batch_size=64, optim.epochs=4,
            moco.queue_size=256, moco.bn_splits=4, eval.pixel_floor=false, eval.knn_test_subset=128]
factors: {moco.momentum: [0.9, 0.99]}
seeds: [0]
resources: {cpus: 1, mem_gb: 2, time_min: 10}
"""
KEYS = ["momentum=0.9,seed=0", "momentum=0.99,seed=0"]


def _runs(client, name: str) -> dict:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return {}
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def _epochs_on_server(client, name: str) -> dict[str, list[int]]:
    runs = _runs(client, name)
    return {key: sorted(m.step for m in client.get_metric_history(runs[key].info.run_id, "epoch/loss"))
            for key in KEYS if key in runs}


def _epochs_on_disk(results: Path, name: str) -> dict[str, list[int]]:
    return {key: [r["epoch"] for r in runio.read_jsonl(results / name / "runs" / key / "metrics.jsonl")
                  if r.get("kind") == "epoch"] for key in KEYS}


@pytest.mark.slow
def test_the_driver_relays_a_study_to_mlflow_through_an_outage(tmp_path, mlflow_server, monkeypatch, harness_cli):
    results, name = tmp_path / "results", "tracked"
    study = tmp_path / f"{name}.yaml"
    study.write_text(STUDY)
    client = mlflow_server.client()
    stderr, gates = tmp_path / "driver.err", tmp_path / "gates"
    gates.mkdir()
    for epoch in (1, 3):  # the runs wait after epochs 1 and 3 until the test lets them go on
        (gates / f"hold-{epoch}").touch()
    env = {**os.environ, "HARNESS_RESULTS": str(results), "PYTHONUNBUFFERED": "1", "HARNESS_FAULT": f"hold@{gates}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(stderr, "w") as err:
        driver = subprocess.Popen([sys.executable, "-m", "harness.study", str(study), "--executor", "local",
                                   "--poll", "0.5", "--track", mlflow_server.uri], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        # Relayed while the jobs train: the server has each run's first epoch while they wait after it.
        wait_until(lambda: all(1 in _epochs_on_server(client, name).get(key, []) for key in KEYS),
                   "both runs' first epoch on the MLflow server")
        assert _epochs_on_server(client, name) == {key: [1] for key in KEYS}
        mlflow_server.stop()
        (gates / "hold-1").unlink()  # epochs 2 and 3 are trained with the server down
        wait_until(lambda: all(e == [1, 2, 3] for e in _epochs_on_disk(results, name).values()),
                   "epochs 2 and 3 of each run written while MLflow is down")
        wait_until(lambda: "does not answer" in stderr.read_text(), "the driver's warning that MLflow is down")
        mlflow_server.start()
        # The driver catches up by itself while the runs still wait: epochs 2 and 3, once each.
        wait_until(lambda: all(3 in _epochs_on_server(client, name)[key] for key in KEYS),
                   "the driver to send what the server missed")
        assert _epochs_on_server(client, name) == {key: [1, 2, 3] for key in KEYS}
        (gates / "hold-3").unlink()
        out, _ = driver.communicate(timeout=hang_s())
    finally:
        if driver.poll() is None:
            driver.kill()
    err = stderr.read_text()
    assert driver.returncode == 0, err[-3000:]
    assert "answers again" in err and "Traceback" not in err
    ostudy = optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}")
    assert sorted(t.user_attrs["key"] for t in ostudy.trials if t.state.name == "COMPLETE") == KEYS

    # Everything once: the curves as the run directories have them, the params, the probe, the report.
    runs = _runs(client, name)
    assert sorted(runs) == [*KEYS, "report"]
    for t in ostudy.trials:
        run = runs[t.user_attrs["key"]]
        assert run.info.status == "FINISHED"
        assert run.data.params == {"moco.momentum": str(t.params["moco.momentum"]), "seed": "0"}
        assert run.data.tags["harness.level"] == f"moco.momentum={t.params['moco.momentum']}"
        on_disk = curves.read(results / name / t.user_attrs["run_dir"])
        for series in ("step/loss", "step/lr", "epoch/loss", "epoch/knn_top1", "epoch/key_consistency"):
            history = client.get_metric_history(run.info.run_id, series)
            assert sorted((m.step, m.value) for m in history) == \
                sorted((p.x, pytest.approx(p.value)) for p in on_disk if p.series == series), series
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")] == [1, 2, 3, 4]
        assert run.data.metrics["final/probe_top1"] == pytest.approx(t.user_attrs["probe_top1"])
    artifacts = {a.path for a in client.list_artifacts(runs["report"].info.run_id, "report")}
    assert {"report/report.html", "report/summary.csv", "report/table.tex"} <= artifacts

    # Another process than the driver (this one: `python -m harness.report NAME --track URI` through its
    # face) reads the server's side first: it sends nothing again.
    before = {key: len(client.get_metric_history(runs[key].info.run_id, "step/loss")) for key in KEYS}
    monkeypatch.setattr(runio, "RESULTS", results)
    again = harness_cli("report", name, "--track", mlflow_server.uri, env=dict(tracking.CLIENT_ENV))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {key: len(client.get_metric_history(runs[key].info.run_id, "step/loss")) for key in KEYS} == before

    # The jobs never had the URI: not in what was pickled for them, nor in anything they wrote.
    job_files = [p for p in (results / name / "jobs").rglob("*") if p.is_file()]
    assert job_files and not any(f"127.0.0.1:{mlflow_server.port}".encode() in p.read_bytes() for p in job_files)
