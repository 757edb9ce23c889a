"""Re-evaluation of a finished study (`python -m harness.study NAME --evaluate standard`): every
finished run gains the second protocol through jobs of its own, nothing is trained again, a failed
evaluation is tried again, and the report shows both protocols side by side."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from timing import hang_s

from harness.run import runio
from harness.run.runio import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
STUDY = """\
description: 2 tiny trials probed fast; the standard probe is added afterwards
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=256, data.test_subset=256, optim.batch_size=64, optim.epochs=2,
            moco.queue_size=256, moco.bn_splits=4, eval.pixel_floor=false, eval.knn_test_subset=128, eval.probe=fast,
            eval.probe_epochs=3, eval.probe_batch_size=64, "runtime.keep_epochs=[1]"]
factors: {moco.momentum: [0.9, 0.99]}
seeds: [0]
retries: 1
resources: {cpus: 1, mem_gb: 2, time_min: 10}
"""
KEYS = [f"momentum={m},seed=0" for m in (0.9, 0.99)]


def _study(tmp_path: Path, *args: str, fault: str | None = None, name: str = "evaluated") -> subprocess.CompletedProcess:
    env = {**os.environ, "HARNESS_RESULTS": str(tmp_path / "results"), **({"HARNESS_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "harness.study", str(tmp_path / f"{name}.yaml"), "--executor", "local",
                           "--poll", "0.5", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=hang_s())


def _trained(run: Path) -> tuple:
    """What pretraining left: its attempts, its metrics, its checkpoints."""
    return (len(read_jsonl(run / "attempts.jsonl")), (run / "metrics.jsonl").read_text(),
            sorted((p.name, p.stat().st_mtime_ns) for p in (run / "checkpoints").iterdir()))


@pytest.mark.slow
def test_a_finished_study_gets_the_standard_probe_by_one_command(tmp_path, study_cli, harness_cli, monkeypatch):
    """resources.eval (trials_per_job: 2): the study's own evaluations and the added ones run two a job.
    The trials' jobs end with pretraining (their devices freed) and the driver then submits the
    evaluations as jobs of their own; one that fails (injected, once per run) is tried again and the
    trial completes without a second pretraining. Then the standard probe is added to the finished runs."""
    (tmp_path / "evaluated.yaml").write_text(
        STUDY.replace("time_min: 10}", "time_min: 10, eval: {time_min: 5, trials_per_job: 2}}"))
    first = _study(tmp_path, "--no-report", fault="evaluate")  # the report is read once both protocols ran
    assert first.returncode == 0, first.stderr[-3000:]
    runs = {key: tmp_path / "results" / "evaluated" / "runs" / key for key in KEYS}
    for key, run in runs.items():
        assert f"{key}: pretrained; evaluation job" in first.stdout and f"{key}: evaluation failed (" in first.stdout
        assert json.loads((run / "probe.json").read_text())["protocol"] == "fast"
        assert len(read_jsonl(run / "attempts.jsonl")) == 1  # pretrained once: the retry only evaluated
    assert "injected fault (HARNESS_FAULT=evaluate)" in first.stdout
    import optuna

    trials = optuna.load_study(study_name="evaluated", storage=f"sqlite:///{tmp_path / 'results' / 'evaluated' / 'study.db'}").trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]
    assert all(t.user_attrs["eval_tries"] == 2 and t.value == t.user_attrs["probe_top1"] for t in trials)
    # The evaluations ran in jobs of their own (their own folder and scheduler ids), after the trials' jobs.
    eval_jobs = {t.user_attrs["eval_job_id"] for t in trials}
    assert eval_jobs.isdisjoint({t.user_attrs["job_id"] for t in trials})
    assert all(any((tmp_path / "results" / "evaluated" / "jobs-eval").glob(f"{job}_*")) for job in eval_jobs)
    before = {key: _trained(run) for key, run in runs.items()}
    for marker in (tmp_path / "results").rglob(".fault-evaluate"):
        marker.unlink()  # the added protocol's first tries fail too

    # The first try of every evaluation fails (an injected error): each is tried again, nothing retrains.
    jobs = tmp_path / "results" / "evaluated" / "jobs-eval"
    packed_before = len(list(jobs.glob("*_submitted.pkl")))
    added = _study(tmp_path, "--evaluate", "standard", "--no-report", fault="evaluate")
    assert added.returncode == 0, added.stderr[-3000:]
    assert "standard evaluation of 2 finished run(s): no training" in added.stdout
    assert "standard evaluation of 2 finished run(s) (try 2): no training" in added.stdout
    assert "standard evaluation: 2 run(s) evaluated" in added.stdout
    assert len(list(jobs.glob("*_submitted.pkl"))) - packed_before == 2  # 2 tries x 1 job of 2 evaluations
    for key, run in runs.items():
        standard = json.loads((run / "probe-standard.json").read_text())
        assert standard["protocol"] == "standard" and len(standard["top1_per_epoch"]) == 3
        assert json.loads((run / "probe.json").read_text())["protocol"] == "fast"  # the first protocol stays
        assert _trained(run) == before[key]  # no pretraining ran: same attempts, metrics and checkpoints
    monkeypatch.setattr(runio, "RESULTS", tmp_path / "results")
    assert harness_cli("report", "evaluated").returncode == 0  # in this process (the driver's own: at the end)
    report = (tmp_path / "results" / "evaluated" / "report" / "report.md").read_text()
    section = report.split("## Probe protocols")[1].split("\n## ")[0]
    assert "fast top-1" in section and "standard top-1" in section and "standard − fast" in section

    quick = lambda *args, name="evaluated": study_cli(  # noqa: E731  commands that submit nothing: in this process
        tmp_path / "results", str(tmp_path / f"{name}.yaml"), "--executor", "local", *args)
    again = quick("--evaluate", "standard", "--no-report")
    assert again.returncode == 0 and "standard evaluation: 0 run(s) evaluated" in again.stdout
    assert "no training" not in again.stdout  # nothing was submitted

    # Another study of the same runs with another probe (2 standard epochs) and another kNN monitor:
    # evaluation is not part of a run's identity, so it shares the pretraining and only probes it.
    (tmp_path / "sibling.yaml").write_text(STUDY.replace("eval.probe=fast", "eval.probe=standard, eval.knn_every=1")
                                           .replace("eval.probe_epochs=3", "eval.probe_epochs=2"))
    plan = quick("--dry-run", name="sibling")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert ("2 of the 2 trials are finished runs of other studies (shared): 0 to train; 2 of the shared runs lack "
            "this study's probe, which runs without training") in plan.stdout
    sibling = _study(tmp_path, "--no-report", name="sibling")
    assert sibling.returncode == 0, sibling.stderr[-3000:]
    trials = optuna.load_study(study_name="sibling", storage=f"sqlite:///{tmp_path / 'results' / 'sibling' / 'study.db'}").trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]
    for key, run in runs.items():
        assert f"{key}: shares the pretraining of evaluated/runs/{key}" in sibling.stdout
        assert (tmp_path / "results" / "sibling" / "runs" / key).resolve() == run.resolve()
        attempts, metrics, checkpoints = _trained(run)
        assert (attempts, metrics, checkpoints) == (before[key][0] + 1, *before[key][1:])  # one more start, no step
        [other] = [json.loads(p.read_text()) for p in run.glob("probe-standard-*.json")]
        assert len(other["top1_per_epoch"]) == 2 and other["settings"]["probe_epochs"] == 2
        assert json.loads((run / "probe-standard.json").read_text())["settings"]["probe_epochs"] == 3  # kept
        [trial] = [t for t in trials if t.user_attrs["key"] == key]
        assert trial.value == other["top1"] and trial.user_attrs["knn_top1"] is not None
        assert trial.user_attrs["shared_from"] == f"evaluated/runs/{key}"  # its cost: the probe, not the training
        assert trial.user_attrs["hours"] * 3600 == pytest.approx(other["seconds"]) and trial.user_attrs["shared_hours"] > 0
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "completed" and status["loss"] is not None  # the final figures kept

    # A learning curve: the fast probe of the checkpoint each run kept at epoch 1 (runtime.keep_epochs).
    last = quick("--evaluate", "fast", "--epoch", "2", "--no-report")  # the last epoch: already probed
    assert last.returncode == 0 and "fast evaluation of epoch 2: 0 run(s) evaluated" in last.stdout
    early = _study(tmp_path, "--evaluate", "fast", "--epoch", "1")
    assert early.returncode == 0, early.stderr[-3000:]
    assert "fast evaluation of epoch 1: 2 run(s) evaluated" in early.stdout
    for key, run in runs.items():
        [part_way] = [r for r in map(json.loads, (p.read_text() for p in run.glob("probe-fast-*.json")))]
        assert part_way["epoch"] == 1 and part_way["settings"]["epoch"] == 1
        assert part_way["top1"] != json.loads((run / "probe.json").read_text())["top1"]  # another checkpoint
        assert _trained(run)[1:] == before[key][1:]  # metrics and checkpoints untouched
    report = (tmp_path / "results" / "evaluated" / "report" / "report.md").read_text()
    section = report.split("## Probe protocols")[1].split("\n## ")[0]
    assert "Rank correlation (Spearman) of the levels' means between the protocols" in section
    assert "fast @ epoch 1 − fast" in section  # each protocol against the fast one: the part-way probe, and the
    assert section.count("The study's runs under two probe protocols") == 3  # two standard settings (by key)
    never = quick("--evaluate", "fast", "--epoch", "3", "--no-report")
    assert never.returncode == 2 and "--epoch 3: 2 run(s) kept no checkpoint of that epoch" in never.stderr

