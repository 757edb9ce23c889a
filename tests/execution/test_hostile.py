"""Hostile and broken input: always a clear error of our own, never a traceback from deep inside."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timing import hang_s

from harness.planning.studyfile import STUDY_DIR, load_study, parse_study, trial_key, validate_levels
from harness.run.config import make_config
from harness.run.errors import ConfigError, StudyError
from harness.training.probe import ProbeError, load_trained_encoder

ROOT = Path(__file__).resolve().parents[2]
VALID = yaml.safe_load((STUDY_DIR / "smoke.yaml").read_text())
CLEAR = (StudyError, ConfigError)

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=12), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@st.composite
def mutated_study(draw):
    data = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["drop", "replace", "add", "factor", "resource", "level"]))
    if kind == "drop":
        data.pop(draw(st.sampled_from(sorted(data))))
    elif kind == "replace":
        data[draw(st.sampled_from(sorted(data)))] = draw(junk)
    elif kind == "add":
        data[draw(st.text(min_size=1, max_size=10))] = draw(junk)
    elif kind == "factor":
        data["factors"] = {draw(st.text(max_size=20)): draw(st.lists(junk, min_size=1, max_size=3))}
    elif kind == "resource":
        data["resources"] = {draw(st.sampled_from(["gpus", "cpus", "time_min", "mem_gb", "nodes", "bogus"])): draw(junk)}
    else:
        data["factors"] = {"moco.momentum": [draw(junk)]}
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_study())
def test_mutated_study_files_fail_clearly_or_load(data):
    try:
        study = parse_study("smoke", STUDY_DIR / "smoke.yaml", data)
        validate_levels(study, None, [])
        study.resources_for()
    except CLEAR as exc:
        assert str(exc)  # says something
    # any other exception type fails the test: it would be a traceback from deep inside


overrides = st.builds(lambda k, v: f"{k}={v}",
                      st.sampled_from(["moco.momentum", "moco.queue_size", "moco.temperature", "optim.batch_size",
                                       "optim.epochs", "data.dataset", "moco.key_encoder", "nonsense.key",
                                       "moco", "eval.knn_k", "optim.milestones", "data.train_subset", ""]),
                      st.one_of(st.integers(-10**15, 10**15).map(str), st.floats().map(str),
                                st.sampled_from(["[1, 2]", "{a: 1}", "true", "null", "'x'", "!!python/object:os.system",
                                                 "[", "1e400", "-.inf", ".nan"]),
                                st.text(max_size=8)))


@settings(max_examples=200, deadline=None)
@given(st.lists(overrides, max_size=3))
def test_random_overrides_fail_clearly_or_validate(sets):
    try:
        make_config("fmnist-tiny", sets)
    except ConfigError as exc:
        assert str(exc)


def test_yaml_is_data_only(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("description: !!python/object/apply:os.system ['touch /tmp/harness-pwned']\n"
                    "recipe: fmnist-tiny\nfactors: {moco.momentum: [0.9]}\nseeds: [0]\n")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(str(evil))
    assert not Path("/tmp/harness-pwned").exists()


@pytest.mark.parametrize("name", ["../smoke", "smoke/../../etc", "/etc/passwd", "..", "a/b", "smo ke"])
def test_study_names_cannot_escape(name):
    with pytest.raises(StudyError):
        load_study(name)


def test_trial_keys_stay_inside_the_runs_folder():
    key = trial_key({"moco.key_encoder": "../../../etc", "seed": 0})
    assert "/" not in key and "\\" not in key
    assert (Path("results/study/runs") / key).resolve().parent == Path("results/study/runs").resolve()


def test_truncated_and_foreign_checkpoints_give_a_clear_probe_error(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: fmnist-tiny\n")
    (run / "checkpoints" / "ckpt-000000010.pt").write_bytes(b"PK\x03\x04 truncated")
    torch.save({"state_dict": {}}, run / "checkpoints" / "ckpt-000000005.pt")
    with pytest.warns(UserWarning):
        with pytest.raises(ProbeError, match="no usable checkpoint"):
            load_trained_encoder(run, torch.device("cpu"))


def test_results_directory_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    env = {**os.environ, "HARNESS_RESULTS": str(blocker)}
    proc = subprocess.run([sys.executable, "-m", "harness.study", "smoke", "--executor", "local"], env=env,
                          capture_output=True, text=True, timeout=hang_s(), cwd=ROOT)
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text().startswith("a file")  # untouched


@pytest.mark.parametrize("argv, field", [
    (["--parallel", "0"], "--parallel"), (["--parallel", "-1"], "--parallel"), (["--workers", "-1"], "--workers"),
    (["--poll", "0"], "--poll"), (["--heartbeat", "0"], "--heartbeat"), (["--db-outage-limit", "-1"], "--db-outage-limit"),
    (["--set", "runtime.threads=-1"], "runtime.threads"), (["--set", "runtime.threads=abc"], "runtime.threads"),
    (["--set", "runtime.log_every=0"], "runtime.log_every"),
    (["--set", "runtime.checkpoint_every=-1"], "runtime.checkpoint_every"),
])
def test_a_bad_command_line_number_is_one_line_naming_it_and_exit_2(argv, field, capsys, tmp_path, monkeypatch):
    """Each was a traceback (ZeroDivisionError, torch's set_num_threads) or silently accepted."""
    from harness.run import runio
    from harness.study import main

    monkeypatch.setattr(runio, "RESULTS", tmp_path)
    assert main(["smoke", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"{field}:" in err, err


@pytest.mark.parametrize("face, argv, field", [
    ("decide", ["--runs", "0"], "--runs"), ("decide", ["--initial", "1"], "--initial"),
    ("decide", ["--confidence", "1"], "--confidence"), ("decide", ["--margin", "-0.1"], "--margin"),
    ("bench", ["train", "--steps", "0"], "--steps"), ("bench", ["train", "--repeats", "-1"], "--repeats"),
    ("probe", ["nowhere", "--epochs", "0"], "--epochs"),
])
def test_the_other_faces_refuse_bad_numbers_in_one_line(face, argv, field, capsys):
    import importlib

    assert importlib.import_module(f"harness.{face}").main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {field}:"), err


@pytest.mark.parametrize("tracking, field", [({"wandb": "x"}, "tracking.wandb"), ("http://mlflow:5000", "tracking"),
                                             ({"mlflow": 5000}, "tracking")])
def test_a_wrong_tracking_setting_names_its_key(tracking, field):
    with pytest.raises(StudyError, match=f"smoke.yaml: .*{field.replace('.', '[.]')}"):
        parse_study("smoke", STUDY_DIR / "smoke.yaml", {**VALID, "tracking": tracking})
    assert parse_study("smoke", STUDY_DIR / "smoke.yaml",
                       {**VALID, "tracking": {"mlflow": "http://mlflow.lab:5000"}}).tracking == {"mlflow": "http://mlflow.lab:5000"}


@pytest.mark.parametrize("evaluation, says", [(5, "a mapping of resources for the evaluation job"),
                                              ({"nodes": 2}, "one process on one node"),
                                              ({"gpus": -1}, "eval.gpus: a non-negative number")])
def test_a_wrong_evaluation_resource_names_its_key(evaluation, says):
    with pytest.raises(StudyError, match=f"smoke.yaml: resources.*{says}"):
        parse_study("smoke", STUDY_DIR / "smoke.yaml", {**VALID, "resources": {"eval": evaluation}})
    study = parse_study("smoke", STUDY_DIR / "smoke.yaml", {**VALID, "resources": {"gpus": 8, "cpus": 80,
                                                                                   "eval": {"time_min": 600}}})
    evaluation_job = study.resources_for().for_evaluation()
    assert (evaluation_job.gpus, evaluation_job.cpus, evaluation_job.nodes, evaluation_job.time_min) == (1, 10, 1, 600)
