"""Studies started before the package was laid out in layers keep working: the job files submitit wrote
then (`*_submitted.pkl`, naming harness.launch, harness.trial and harness.config) still load, and a
restarted driver re-attaches its trials to those jobs."""
import shutil
from pathlib import Path

import optuna

from harness.execution import job_files
from harness.execution.driver import Driver, Options
from harness.execution.jobs import PackedJob, TrialJob, members
from harness.planning.studyfile import load_study
from harness.run.config import RunConfig, make_config

BEFORE = Path(__file__).resolve().parents[1] / "fixtures" / "jobs-pickled-before-the-layers"


def test_job_files_pickled_by_the_flat_package_load_as_todays_classes():
    single = job_files.load(BEFORE / "1001_submitted.pkl").function
    packed = job_files.load(BEFORE / "1002_submitted.pkl").function
    assert type(single) is TrialJob and type(packed) is PackedJob  # the new module's classes, not copies
    assert [m.trial_id for m in members(single)] == [3] and [m.trial_id for m in members(packed)] == [5, 6]
    config = members(packed)[1].spec.config
    assert isinstance(config, RunConfig) and config.moco.momentum == 0.999
    # the same run: the identity a pickled config has is the one today's code gives the same settings
    assert config.digest() == make_config("fmnist-tiny", ["moco.momentum=0.999"]).digest()


def test_a_restarted_driver_finds_the_jobs_of_trials_whose_ids_it_had_not_recorded(tmp_path, monkeypatch):
    """A driver killed between submitting and recording job ids: the new one reads the old pickles."""
    from harness.run import runio

    monkeypatch.setattr(runio, "RESULTS", tmp_path)
    driver = Driver(load_study("smoke"), Options(executor="local", wait=False, report=False))
    driver.open()
    try:
        trials = [driver.ostudy.ask() for _ in range(7)]
        by_id = {t._trial_id: t.number for t in trials}
        assert {3, 5, 6} <= set(by_id)
        shutil.copytree(BEFORE, driver.dir / "jobs", dirs_exist_ok=True)
        running = [t for t in driver.trials() if t.state == optuna.trial.TrialState.RUNNING]
        driver._recover_job_ids(running)
        job_ids = {t.number: t.user_attrs.get("job_id") for t in driver.trials()}
        assert job_ids[by_id[3]] == "1001" and job_ids[by_id[5]] == job_ids[by_id[6]] == "1002"
        assert sum(v is not None for v in job_ids.values()) == 3
    finally:
        driver.close()
