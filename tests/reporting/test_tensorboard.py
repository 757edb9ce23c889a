"""TensorBoard logs of a study (harness.reporting.tensorboard): a real TensorBoard serves the committed
momentum sweep's scalars and HParams, and a run killed and resumed has each step once."""
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from timing import hang_s, wait_until

from harness.execution.storage import open_storage
from harness.reporting import tensorboard
from harness.reporting.tables import trials_table
from harness.run import runio

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not tensorboard.available(), reason="the track extra is not installed")


def _scalars(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_real_tensorboard_serves_the_studys_scalars_and_hparams(tmp_path):
    study_dir = ROOT / "results" / "examples" / "momentum_sweep"
    ostudy = optuna.load_study(study_name="momentum_sweep",
                               storage=open_storage(f"sqlite:///{study_dir / 'study.db'}", heartbeat_s=None))
    trials = trials_table(ostudy, study_dir)
    tensorboard.write_study(trials, ["moco.momentum"], study_dir, tmp_path / "tb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "tb"),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=hang_s()) as response:
            return json.loads(response.read())

    def runs_listed() -> bool:
        try:
            return len(get("/data/runs")) == 10
        except OSError:
            return False

    try:
        wait_until(runs_listed, "TensorBoard listing the sweep's 10 runs")
        knn = get("/data/plugin/scalars/scalars?run=momentum%3D0.99%2Cseed%3D1&tag=epoch%2Fknn_top1")
        assert [point[1] for point in knn] == list(range(1, 17))  # [wall time, step, value]: 16 epochs
        experiment = get("/data/plugin/hparams/experiment", {"experimentName": ""})
        momentum = next(h for h in experiment["hparamInfos"] if h["name"] == "moco.momentum")
        assert sorted(momentum["domainDiscrete"]) == [0.0, 0.9, 0.99, 0.999, 0.9999]
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"final/probe_top1", "final/knn_top1"}
    finally:
        server.terminate()
        server.wait(timeout=hang_s())


def test_a_resumed_run_has_each_step_once(tmp_path):
    """metrics.jsonl as a run leaves it when killed mid-epoch 2 and resumed from the epoch-1
    checkpoint (train truncates it to the checkpoint's step), logged twice: each point once."""
    run = tmp_path / "runs" / "momentum=0.99,seed=0"
    run.mkdir(parents=True)
    metrics = run / "metrics.jsonl"
    first = [{"kind": "step", "epoch": 0, "step": s, "loss": 7.0 - s / 100, "lr": 0.06} for s in (10, 20, 30)]
    first += [{"kind": "epoch", "epoch": 1, "step": 39, "loss": 6.5, "knn_top1": 0.7, "pretext_acc": 0.1, "lr": 0.06}]
    first += [{"kind": "step", "epoch": 1, "step": s, "loss": 6.0, "lr": 0.05} for s in (50, 60)]  # then killed
    metrics.write_text("".join(json.dumps(r) + "\n" for r in first))
    runio.truncate_metrics(metrics, 39)  # the resume, from the checkpoint at step 39
    redone = [{"kind": "step", "epoch": 1, "step": s, "loss": 5.9, "lr": 0.05} for s in (50, 60, 70)]
    redone += [{"kind": "epoch", "epoch": 2, "step": 78, "loss": 5.8, "knn_top1": 0.72, "pretext_acc": 0.2, "lr": 0.05}]
    with open(metrics, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in redone))
    import pandas as pd

    trials = pd.DataFrame([{"key": run.name, "run_dir": f"runs/{run.name}", "moco.momentum": 0.99, "seed": 0,
                            "state": "COMPLETE", "probe_top1": 0.85}])
    for _ in range(2):  # every report rewrites the logs: a second one doubles nothing
        tensorboard.write_study(trials, ["moco.momentum"], tmp_path, tmp_path / "tb")
    assert len(os.listdir(tmp_path / "tb" / run.name)) == 1
    scalars = _scalars(tmp_path / "tb" / run.name)
    assert [s for s, _ in scalars["step/loss"]] == [10, 20, 30, 50, 60, 70]
    assert scalars["step/loss"][3][1] == pytest.approx(5.9)  # the redone step, not the killed attempt's
    assert [s for s, _ in scalars["epoch/knn_top1"]] == [1, 2]
    shutil.rmtree(tmp_path / "tb")
