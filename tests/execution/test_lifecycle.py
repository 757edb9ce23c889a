"""One trial lifecycle: run identity, studies stored with their results, factor overrides, portable
tables, plot rules by dotted key. The restart scenario runs for real (local executor, SIGKILL)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from timing import hang_s

from harness import report as harness_report
from harness.reporting.plots import _axis
from harness.run import runio
from harness.run.config import RUNTIME_ONLY, config_from_dict, identity_diff, make_config, with_overrides
from harness.run.runio import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.tiny_widths=[8,16,32]", "data.train_subset=512", "data.test_subset=256", "optim.batch_size=64", "moco.queue_size=256",
         "moco.bn_splits=4", "eval.pixel_floor=false", "eval.knn_test_subset=128"]


def study_env(results: Path) -> dict:
    return {**os.environ, "HARNESS_RESULTS": str(results), "PYTHONUNBUFFERED": "1"}


def study(results: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.study", *args, "--poll", "0.5"], env=study_env(results),
                          capture_output=True, text=True, timeout=hang_s(), cwd=ROOT)


# ---------------------------------------------------------------- identity

def test_identity_ignores_how_a_run_executes_but_not_what_it_computes():
    base = make_config("fmnist-tiny")
    how = make_config("fmnist-tiny", ["runtime.threads=7", "runtime.log_every=3", "runtime.checkpoint_every=5",
                                      "runtime.keep_checkpoints=9", "runtime.compile=true", "data.num_workers=0",
                                      "runtime.channels_last=yes"], name="another/label")
    assert base.digest() == how.digest() and identity_diff(base.to_dict(), how.to_dict()) == []
    # How it is evaluated (monitor, diagnostics, probe) reads the run and never changes it.
    evaluated = make_config("fmnist-tiny", ["eval.probe=standard", "eval.probe_lr=3", "eval.knn_every=5",
                                            "eval.knn_train_subset=1000", "eval.diagnostics_every=0"])
    assert base.digest() == evaluated.digest() and identity_diff(base.to_dict(), evaluated.to_dict()) == []
    for change in ("moco.momentum=0.9", "runtime.seed=1", "moco.queue_size=2048", "runtime.precision=bf16",
                   "data.test_subset=500", "optim.epochs=3"):
        other = make_config("fmnist-tiny", [change])
        assert other.digest() != base.digest(), change
        assert identity_diff(base.to_dict(), other.to_dict()) == [change.split("=")[0]]
    assert all(key.count(".") <= 1 for key in RUNTIME_ONLY) and all(RUNTIME_ONLY.values())  # each says why


def test_identity_drops_what_a_dictionary_mechanism_never_reads():
    """End-to-end keys have no queue and no key encoder: its K and m are not part of what it computes
    (so the encoder-sharing study's end-to-end point is the mechanisms study's); MoCo's K and the
    bank's K and momentum are."""
    def digest(encoder: str, *changes: str) -> str:
        return make_config("fmnist-tiny", [f"moco.key_encoder={encoder}", "moco.queue_size=256", *changes]).digest()

    assert digest("end_to_end") == digest("end_to_end", "moco.queue_size=4096", "moco.momentum=0.9")
    assert digest("shared") == digest("shared", "moco.momentum=0.9") != digest("shared", "moco.queue_size=512")
    assert digest("momentum") == digest("momentum", "moco.bank_momentum=0.9") != digest("momentum", "moco.momentum=0.9")
    assert digest("memory_bank") == digest("memory_bank", "moco.momentum=0.9")
    assert digest("memory_bank") != digest("memory_bank", "moco.bank_momentum=0.9")
    assert digest("memory_bank") != digest("memory_bank", "moco.queue_size=512") != digest("end_to_end")


# ---------------------------------------------------------------- bad input, before anything runs

def test_set_on_a_factor_key_is_an_error_naming_the_factor(tmp_path, study_cli):
    proc = study_cli(tmp_path, "momentum_sweep", "--dry-run", "--executor", "local", "--set", "moco.momentum=0.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "moco.momentum=0.5" in proc.stderr and "moco.momentum is a factor" in proc.stderr
    seed = study_cli(tmp_path, "momentum_sweep", "--dry-run", "--executor", "local", "--set", "runtime.seed=3")
    assert seed.returncode == 2 and "runtime.seed is the seeds" in seed.stderr
    bad = tmp_path / "clash.yaml"
    bad.write_text("description: x\nrecipe: fmnist-tiny\noverrides: [moco.momentum=0.9]\n"
                   "factors: {moco.momentum: [0.9, 0.99]}\nseeds: [0]\n")
    clash = study_cli(tmp_path, str(bad), "--dry-run", "--executor", "local")
    assert clash.returncode == 2 and "overrides: moco.momentum=0.9" in clash.stderr
    assert not any(p.name != "clash.yaml" for p in tmp_path.iterdir())


def test_a_started_study_goes_on_with_its_stored_copy(tmp_path, study_cli):
    source = tmp_path / "edited.yaml"
    source.write_text("description: x\nrecipe: fmnist-tiny\nfactors: {moco.momentum: [0.9, 0.99, 0.999]}\n"
                      "seeds: [0]\n")
    stored = tmp_path / "results" / "edited" / "study.yaml"
    stored.parent.mkdir(parents=True)
    stored.write_text("description: x\nrecipe: fmnist-tiny\nfactors: {moco.momentum: [0.9]}\nseeds: [0]\n")
    proc = study_cli(tmp_path / "results", str(source), "--dry-run", "--executor", "local")
    assert proc.returncode == 0, proc.stderr
    assert "differs from the copy" in proc.stderr and str(stored) in proc.stderr
    assert proc.stdout.count("momentum=") == 1  # the copy's single level, not the edited file's three


def test_plot_rules_are_keyed_by_the_full_dotted_key():
    levels = pd.Series([0.0, 0.9, 0.99])
    x, label, scale = _axis("moco.momentum", levels)
    assert scale == "log10" and "1 − m" in label and list(x) == pytest.approx([1.0, 0.1, 0.01])
    x, label, scale = _axis("optim.momentum", levels)  # SGD momentum: a plain axis
    assert scale == "linear" and label == "optim.momentum" and list(x) == [0.0, 0.9, 0.99]
    assert _axis("moco.queue_size", pd.Series([256, 1024]))[2] == "log2"
    assert _axis("model.queue_size", pd.Series([256, 1024]))[2] == "linear"


# ---------------------------------------------------------------- the restart scenario, for real

RESTART = """\
description: 2 trials, killed with their driver after the first checkpoints, resumed with another --parallel
recipe: fmnist-tiny
overrides: [{overrides}, optim.epochs=6, runtime.checkpoint_every=1]
factors: {{moco.momentum: [0.99]}}
seeds: [0, 1]
retries: 2
"""


def _epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]


@pytest.mark.slow
def test_restarted_study_resumes_its_runs_under_other_runtime_settings(tmp_path, monkeypatch):
    """A reboot mid-study (driver and jobs SIGKILLed), then the same command with --parallel 1 (other
    thread counts): every trial completes from its checkpoint, each epoch logged once; the study was
    given as a path, and its report and `harness.report NAME` work from the stored copy."""
    path = tmp_path / "restart.yaml"
    path.write_text(RESTART.format(overrides=", ".join(f"'{o}'" for o in SMALL)))
    results = tmp_path / "results"
    runs = [results / "restart" / "runs" / f"momentum=0.99,seed={s}" for s in (0, 1)]
    cmd = [sys.executable, "-m", "harness.study", str(path), "--executor", "local", "--parallel", "2",
           "--poll", "0.5", "--no-report"]
    # Paced (2 s of sleep after each epoch of a first attempt): both runs are still mid-run when the
    # second one checkpoints, however fast the machine; the resumed attempts run at full speed.
    driver = subprocess.Popen(cmd, env={**study_env(results), "HARNESS_FAULT": "pace@2"}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + hang_s()
    while not all(list((r / "checkpoints").glob("ckpt-*.pt")) for r in runs):
        assert time.monotonic() < deadline and driver.poll() is None, "no checkpoints from both runs"
        time.sleep(0.2)
    job_pids = [a["pid"] for r in runs for a in read_jsonl(r / "attempts.jsonl")]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver ...
    for pid in job_pids:  # ... and the jobs (a reboot)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    driver.wait()
    killed_at = {r: _epochs(r) for r in runs}
    assert all(len(e) < 6 for e in killed_at.values()), killed_at  # both were mid-run

    again = study(results, str(path), "--executor", "local", "--parallel", "1")  # report included
    assert again.returncode == 0, again.stderr[-3000:]
    storage = f"sqlite:///{results / 'restart' / 'study.db'}"
    trials = optuna.load_study(study_name="restart", storage=storage).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["key"] for t in done) == ["momentum=0.99,seed=0", "momentum=0.99,seed=1"]
    assert {t.user_attrs["run_dir"] for t in trials} == {"runs/momentum=0.99,seed=0", "runs/momentum=0.99,seed=1"}
    for lost in (t for t in trials if t.state == optuna.trial.TrialState.FAIL):  # the killed attempts
        assert "killed (a signal, out of memory or a restart of the machine); it was started by an earlier " \
               "driver (the run had reached epoch" in lost.user_attrs["failure_reason"]
    for run in runs:
        assert _epochs(run) == [1, 2, 3, 4, 5, 6]  # every epoch exactly once
        attempts = read_jsonl(run / "attempts.jsonl")
        assert len(attempts) == 2 and attempts[0]["runtime"]["threads"] != attempts[1]["runtime"]["threads"]
        log = "".join(p.read_text() for p in (results / "restart" / "jobs").glob("*.out"))
        assert f"resumed from {run / 'checkpoints'}" in log
    assert {json.loads((r / "identity.json").read_text())["digest"] for r in runs} == \
        {t.user_attrs["identity"] for t in done}  # the storage names the runs by what they compute

    report = results / "restart" / "report"
    assert (results / "restart" / "study.yaml").read_text() == path.read_text()
    table = pd.read_csv(report / "trials.csv")
    assert set(table["run_dir"]) == {"runs/momentum=0.99,seed=0", "runs/momentum=0.99,seed=1"}  # relative
    assert all((results / "restart" / d / "status.json").exists() for d in table["run_dir"])
    (report / "report.md").unlink()
    path.unlink()  # the report reads the stored copy, not the file the study came from
    monkeypatch.setattr(runio, "RESULTS", results)  # `python -m harness.report restart`, in this process
    assert harness_report.main(["restart"]) == 0
    assert "restart" in (report / "report.md").read_text()


def test_a_run_made_while_evaluation_was_part_of_the_identity_is_found_and_read(tmp_path):
    """A committed example's run directory (written before evaluation left the identity: probe.json
    without its settings, identity.json with the older digest) is found by the identity of a config
    with another probe and monitor, and its probe is read as made with its config.yaml's settings."""
    import shutil

    from harness.planning.shared import RunIndex
    from harness.run import evaluations

    example = ROOT / "results" / "examples" / "momentum_sweep" / "runs" / "momentum=0.9,seed=0"
    run = tmp_path / "results" / "old" / "runs" / example.name
    shutil.copytree(example, run)
    assert "settings" not in json.loads((run / "probe.json").read_text())
    made = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    asked = with_overrides(made, ["eval.probe=standard", "eval.knn_every=3", "eval.knn_train_subset=500"])
    assert RunIndex(tmp_path / "results").find(asked.digest()) == run
    probe = evaluations.find(run, evaluations.of(made))
    assert probe is not None and probe["top1"] == json.loads((run / "probe.json").read_text())["top1"]
    assert evaluations.find(run, evaluations.of(asked)) is None  # the standard probe is not there: it is evaluated
    assert evaluations.result_path(run, evaluations.of(asked)).name == "probe-standard.json"
    assert evaluations.result_path(run, evaluations.of(with_overrides(asked, ["eval.probe_lr=7"]))).name.startswith("probe-standard-")
