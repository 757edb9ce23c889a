"""`python -m harness.study`: real Optuna storage, real submitit jobs, a real Slurm."""
import contextlib
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from timing import hang_s, scaled, wait_until

from harness.run import trial_record as record
from harness.run.runio import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def study_cmd(results: Path, *args: str, env_extra: dict | None = None, slurm=None):
    env = {**os.environ, "HARNESS_RESULTS": str(results), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    if slurm is not None:
        env.update(slurm.env)
    return [sys.executable, "-m", "harness.study", *args, "--poll", "1", "--no-report"], env


def run_study(results: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd, env = study_cmd(results, *args, **kw)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=hang_s(), cwd=ROOT)


def trials_of(results: Path, name: str = "smoke") -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{results / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def completed_keys(trials) -> list[str]:
    return sorted(t.user_attrs["key"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE)


SMOKE_KEYS = sorted(f"momentum={m},seed={s}" for m in (0.9, 0.99) for s in (0, 1))


def assert_every_trial_complete_once(trials, keys=SMOKE_KEYS):
    assert completed_keys(trials) == keys  # no duplicated, no lost trial
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert 0.0 < t.value <= 1.0 and t.value == t.user_attrs["probe_top1"]


def assert_jobs_ran_the_snapshot(results: Path, name: str = "smoke"):
    """Every attempt imported harness from the study's code snapshot, not from the live tree."""
    attempts = [json.loads(line) for path in (results / name).rglob("attempts.jsonl")
                for line in path.read_text().splitlines()]
    snapshots = list((results / name / "code").iterdir())
    assert attempts and len(snapshots) == 1
    assert {a["code"] for a in attempts} == {str(snapshots[0])}


# ---------------------------------------------------------------- bad input: nothing submitted

def test_unknown_study(tmp_path, study_cli):
    proc = study_cli(tmp_path, "momentum_swep", "--executor", "local")
    assert proc.returncode == 2 and "unknown study 'momentum_swep'" in proc.stderr and "momentum_sweep" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_factor(tmp_path, study_cli):
    bad = tmp_path / "badfactor.yaml"
    bad.write_text("description: x\nrecipe: fmnist-tiny\nfactors: {moco.momentun: [0.9]}\nseeds: [0]\n")
    proc = study_cli(tmp_path / "res", str(bad), "--executor", "local")
    assert proc.returncode == 2
    assert "moco.momentun" in proc.stderr and "momentum" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "res").exists()


def test_level_that_violates_the_recipe(tmp_path, study_cli):
    proc = study_cli(tmp_path, "smoke", "--executor", "local", "--set", "optim.batch_size=96")
    assert proc.returncode == 2 and "moco.queue_size" in proc.stderr and "multiple" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_slurm_executor_without_slurm(tmp_path, study_cli):
    no_sbatch = study_cli(tmp_path, "smoke", "--executor", "slurm", env={"PATH": str(Path(sys.executable).parent)})
    assert no_sbatch.returncode == 2 and "no SLURM here: sbatch/srun are not on PATH" in no_sbatch.stderr
    # the client installed, no cluster configured
    no_controller = study_cli(tmp_path, "smoke", "--executor", "slurm", env={"SLURM_CONF": None})
    assert no_controller.returncode == 2 and "no SLURM here" in no_controller.stderr
    assert not any(tmp_path.iterdir())


def test_storage_that_cannot_be_opened(tmp_path, study_cli):
    proc = study_cli(tmp_path, "smoke", "--executor", "local", "--storage",
                     "postgresql://harness:s3cret@127.0.0.1:9/optuna")
    assert proc.returncode == 2 and "cannot open" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout  # passwords never printed


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path, study_cli):
    proc = study_cli(tmp_path, "momentum_sweep", "--dry-run", "--executor", "local")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("momentum=") == 10 and "GPU-hours" in proc.stdout
    gpu = tmp_path / "gpu.yaml"  # 3 levels x 2 seeds, 4 GPUs, 90 min: at most 6 x 4 x 1.5 = 36 GPU-hours
    text = ("description: x\nrecipe: fmnist-tiny\nfactors: {moco.momentum: [0.9, 0.99, 0.999]}\n"
            "seeds: [0, 1]\nresources: {gpus: 4, cpus: 16, time_min: 90}\n")
    gpu.write_text(text)
    plan = study_cli(tmp_path / "res", str(gpu), "--dry-run", "--executor", "local")
    assert plan.returncode == 0, plan.stderr
    assert "GPU-hours: at most 36.0 (6 trials x 4 GPUs x 90 min limit)" in plan.stdout
    params = json.loads(plan.stdout.split("job parameters (local): ", 1)[1].splitlines()[0])
    assert params["gpus_per_node"] == 4 and params["nodes"] == 1 and params["tasks_per_node"] == 4
    assert params["timeout_min"] == 90 and params["cpus_per_task"] == 4  # 16 CPUs over 4 processes
    # resources.eval: the probe is a job of its own, counted apart: 6 x 1 GPU x 30 min = 3 GPU-hours
    gpu.write_text(text.replace("time_min: 90}", "time_min: 90, eval: {time_min: 30}}"))
    apart = study_cli(tmp_path / "res", str(gpu), "--dry-run", "--executor", "local")
    assert "GPU-hours: at most 36.0 (6 trials x 4 GPUs x 90 min limit) for pretraining, its probe not included" \
        in apart.stdout, apart.stderr
    assert ("evaluation jobs (resources.eval): at most 3.0 GPU-hours (6 jobs x 1 GPU x 30 min limit, 4 CPUs each); "
            "in all at most 39.0") in apart.stdout
    gpu.write_text(text.replace("gpus: 4,", "gpus: 4, nodes: 2,"))
    two_nodes = study_cli(tmp_path / "res", str(gpu), "--dry-run", "--executor", "local")
    assert two_nodes.returncode == 2 and "resources.nodes: 2 nodes per trial need SLURM" in two_nodes.stderr
    paper = study_cli(tmp_path, "momentum_sweep", "--dry-run", "--executor", "local", "--recipe", "imagenet-r50-v1",
                      "--set", "data.root=/nonexistent")
    assert paper.returncode == 2 and "data.root" in paper.stderr  # the dataset is checked before anything runs
    assert not (tmp_path / "momentum_sweep").exists()


# ---------------------------------------------------------------- the smoke study, end to end

@pytest.mark.slow
def test_smoke_study_with_local_executor(tmp_path, study_cli):
    """The smoke grid run locally, two of its trials already enqueued but never run (what a worker-mode
    driver that died before its workers started leaves): they are neither lost nor duplicated; a
    rerun has nothing left to do; --status lists every trial (those two commands in this process)."""
    storage = f"sqlite:///{tmp_path / 'smoke' / 'study.db'}"
    (tmp_path / "smoke").mkdir()
    left = optuna.create_study(study_name="smoke", storage=storage, direction="maximize")
    for momentum in (0.9, 0.99):
        left.enqueue_trial({"moco.momentum": momentum, "seed": 0}, user_attrs={"key": f"momentum={momentum},seed=0"})
    proc = run_study(tmp_path, "smoke", "--executor", "local", "--parallel", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_every_trial_complete_once(trials_of(tmp_path))
    assert len(trials_of(tmp_path)) == 4
    assert_jobs_ran_the_snapshot(tmp_path)
    again = study_cli(tmp_path, "smoke", "--executor", "local", "--poll", "1", "--no-report")  # nothing rerun
    assert again.returncode == 0 and len(trials_of(tmp_path)) == 4, again.stderr[-3000:]
    status = study_cli(tmp_path, "smoke", "--status")
    assert status.returncode == 0 and "done 4/4 running 0 failed 0" in status.stdout
    rows = [line for line in status.stdout.splitlines() if "COMPLETE" in line]
    assert sorted(line.split()[1] for line in rows) == SMOKE_KEYS


SLOW_PAIR = """\
description: two slow trials on SLURM, one preempted by an admin requeue, one past its 2-min time limit
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=256, data.test_subset=256, optim.batch_size=64, optim.epochs=8,
            moco.queue_size=256, moco.bn_splits=4, eval.pixel_floor=false, eval.knn_every=0,
            runtime.checkpoint_every=1]
factors: {moco.momentum: [0.9, 0.99]}
seeds: [0]
retries: 0   # no retry may rescue them: only submitit's requeue and the checkpoints
resources: {cpus: 1, mem_gb: 2, time_min: 2, signal_delay_s: 60, max_timeouts: 4}
"""


def first_resumed_epoch(log: str) -> int:
    resumed = re.search(r"resumed from \S+ \(epoch (\d+), step", log)
    assert resumed, log[-2000:]
    return int(resumed.group(1))


@pytest.mark.slow
def test_preempted_and_timed_out_trials_resume_from_their_checkpoints(tmp_path, slurm):
    """Both ways SLURM interrupts a job, on a real cluster: `scontrol requeue` (what preemption does)
    and the time limit (Slurm sends USR2 60 s before a 2-min limit, checked every 30 s and up to 60 s
    early: 30-60 s into every attempt; submitit checkpoints and requeues). Each trial must be mid-run
    when hit, resume from its checkpoint and run every epoch exactly once. HARNESS_FAULT=pace@7.5/<run>
    sleeps 7.5 s after each of the timed-out trial's 8 epochs in its first attempt: ~65 s, past the
    signal, at little CPU; the preempted trial sleeps 2 s an epoch, so it is still running when
    requeued at its first checkpoint. Resumed, both finish at full speed, before a time-limit signal
    could add a third attempt."""
    study = tmp_path / "interrupted.yaml"
    study.write_text(SLOW_PAIR)
    results = tmp_path / "results"
    args = [str(study), "--executor", "slurm", "--parallel", "2"]
    pace = {"HARNESS_FAULT": "pace@7.5/momentum=0.99,seed=0+pace@2/momentum=0.9,seed=0"}
    proc = run_study(results, *args, "--no-wait", slurm=slurm, env_extra=pace)
    assert proc.returncode == 0, proc.stderr
    runs = results / "interrupted" / "runs"
    preempted, timed_out = runs / "momentum=0.9,seed=0", runs / "momentum=0.99,seed=0"
    epochs = lambda run: [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]  # noqa: E731
    wait_until(lambda: (preempted / "metrics.jsonl").exists() and epochs(preempted)
             and list((preempted / "checkpoints").glob("ckpt-*.pt")), what="first checkpoint")
    job_id = read_jsonl(preempted / "attempts.jsonl")[0]["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], env=slurm.env, check=True)
    done = run_study(results, *args, slurm=slurm, env_extra=pace)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = trials_of(results, "interrupted")
    assert completed_keys(trials) == ["momentum=0.9,seed=0", "momentum=0.99,seed=0"] and len(trials) == 2
    jobs = results / "interrupted" / "jobs"
    for run in (preempted, timed_out):
        assert epochs(run) == list(range(1, 9))  # every epoch exactly once
        attempts = read_jsonl(run / "attempts.jsonl")
        assert len(attempts) >= 2
        log = "".join(p.read_text() for p in jobs.glob(f"{attempts[0]['job_id']}_*.out"))
        assert 1 <= first_resumed_epoch(log) < 8  # hit mid-run, resumed from a checkpoint
    timed_log = "".join(p.read_text() for p in jobs.glob(f"{read_jsonl(timed_out / 'attempts.jsonl')[0]['job_id']}_*.out"))
    assert "Caught signal SIGUSR2" in timed_log and "this job is timed-out" in timed_log  # Slurm's time limit
    assert "Requeued job" in timed_log  # by submitit, from inside the job


PACKED_PAIR = """description: two trials a job
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=512, data.test_subset=256, optim.batch_size=64, optim.epochs=10, moco.queue_size=256,
            moco.bn_splits=4, eval.pixel_floor=false, eval.knn_test_subset=128, eval.probe_epochs=5, runtime.log_every=4]
factors: {moco.momentum: [0.9, 0.99]}
seeds: [0]
retries: 1
resources: {cpus: 2, mem_gb: 2, time_min: 10, trials_per_job: 2}
"""


def step_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _descendants(pid: int) -> list[int]:
    return [d for c in _children(pid) for d in (c, *_descendants(c))]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


@pytest.mark.slow
def test_a_packed_job_killed_alone_takes_its_trials_with_it(tmp_path, monkeypatch):
    """Slurm ends a job by killing every process of its cgroup; a local executor, an out-of-memory kill
    or a node agent may kill the job's process only. Its trials must not train on by themselves, in run
    directories that a retry is about to resume. Both trials of a real pack (the local executor's job)
    sleep after their first epoch (pace@600); the job's process is SIGKILLed; its trials end at once."""
    import submitit
    from processes import exited

    from harness.execution.jobs import PackedJob, TrialJob
    from harness.execution.trial import TrialSpec
    from harness.run.config import make_config
    from harness.run.runio import RunDirBusy, lock_run_dir

    monkeypatch.setenv("HARNESS_FAULT", "pace@600")
    specs = []
    for momentum in (0.9, 0.99):
        cfg = make_config("fmnist-tiny", ["model.tiny_widths=[8,16,32]", "data.train_subset=128", "data.test_subset=128",
                                          "optim.batch_size=64", "optim.epochs=3", "moco.queue_size=128",
                                          "moco.bn_splits=4", "eval.pixel_floor=false", "eval.knn_every=0",
                                          f"moco.momentum={momentum}"])
        key = f"momentum={momentum}"
        specs.append(TrialSpec(key, {"moco.momentum": momentum}, tmp_path / "runs" / key, cfg, "probe_top1", 0))
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=math.ceil(hang_s() / 60))  # a limit that only catches a hang
    job = executor.submit(PackedJob([TrialJob(spec, None, "packed", i, None, threads=1) for i, spec in enumerate(specs)]))
    first_epoch = lambda spec: any(r.get("kind") == "epoch" for r in read_jsonl(spec.run_dir / "metrics.jsonl"))  # noqa: E731

    def freed(spec) -> bool:  # no process trains in the run directory any more: its lock can be taken
        try:
            lock_run_dir(spec.run_dir).close()
        except RunDirBusy:
            return False
        return True

    below: list[int] = []
    try:
        wait_until(lambda: all(first_epoch(spec) for spec in specs), "both packed trials past their first epoch")
        (job_process,) = [c for c in _children(job._process.pid) if "submitit.core._submit" in _cmdline(c)]
        below = [job_process, *_descendants(job_process)]
        os.kill(job_process, signal.SIGKILL)
        # They die with their job (PR_SET_PDEATHSIG); the ceiling only catches a trial left sleeping its 600 s.
        wait_until(lambda: all(freed(spec) for spec in specs), "the packed trials to end with their job's process",
                   ceiling=scaled(60))
    finally:  # a failed test leaves nothing sleeping behind it
        job.cancel(check=False)
        for pid in below:
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_trials_packed_in_one_slurm_job_requeue_together_and_fail_alone(tmp_path, slurm):
    """resources.trials_per_job: 2 on the real cluster: both trials start in one array task, one process
    each. `scontrol requeue` at their first checkpoints requeues the job: both resume mid-run. Then one
    trial's process is SIGKILLed at step 64 (HARNESS_FAULT names its run): the other finishes in the pack,
    the killed one is recorded with its reason and retried in a job of its own, from its checkpoint.
    Every result is bit-identical to the same two trials run unpacked, one thread each."""
    study = tmp_path / "packed.yaml"
    study.write_text(PACKED_PAIR)
    results = tmp_path / "results"
    args = [str(study), "--executor", "slurm", "--parallel", "2"]
    faults = {"HARNESS_FAULT": "after-step-64/momentum=0.9,seed=0+pace@1"}  # one trial of the pack killed
    plan = run_study(results, *args, "--dry-run", slurm=slurm)
    assert "packing: 2 trials a job, one process each with 1 thread(s), sharing the job's 2 CPUs: 1 jobs for 2 " \
           "trials" in plan.stdout, plan.stdout
    alone = tmp_path / "alone" / "packed.yaml"  # the same trials unpacked, run meanwhile: compared at the end
    alone.parent.mkdir()
    alone.write_text(PACKED_PAIR.replace(", trials_per_job: 2", ""))
    alone_results = tmp_path / "unpacked"
    twin_cmd, twin_env = study_cmd(alone_results, str(alone), "--executor", "local", "--parallel", "2", "--no-share")
    twins = subprocess.Popen(twin_cmd, env=twin_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    proc = run_study(results, *args, "--no-wait", slurm=slurm, env_extra=faults)
    assert proc.returncode == 0, proc.stderr
    runs = results / "packed" / "runs"
    killed, other = runs / "momentum=0.9,seed=0", runs / "momentum=0.99,seed=0"
    wait_until(lambda: all(list((r / "checkpoints").glob("ckpt-*.pt")) for r in (killed, other)), what="checkpoints")
    (pack_job,) = {read_jsonl(r / "attempts.jsonl")[0]["job_id"] for r in (killed, other)}  # one job, both trials
    subprocess.run(["scontrol", "requeue", pack_job], env=slurm.env, check=True)
    done = run_study(results, *args, slurm=slurm, env_extra=faults)
    assert done.returncode == 0, done.stderr[-3000:]

    trials = trials_of(results, "packed")
    assert completed_keys(trials) == ["momentum=0.9,seed=0", "momentum=0.99,seed=0"] and len(trials) == 3
    (failed,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.user_attrs["key"] == "momentum=0.9,seed=0" and failed.user_attrs["job_id"] == pack_job
    assert "the trial's process in the packed job was killed by signal SIGKILL" in failed.user_attrs["failure_reason"]
    alone = {a["job_id"] for a in read_jsonl(killed / "attempts.jsonl")} - {pack_job}
    assert len(alone) == 1 and alone.isdisjoint(a["job_id"] for a in read_jsonl(other / "attempts.jsonl"))
    pack_log = "".join(p.read_text() for p in (results / "packed" / "jobs").glob(f"{pack_job}_*.out"))
    for run in (killed, other):  # the requeue hit both mid-run; each resumed from its own checkpoint
        resumed = re.search(rf"resumed from \S*{re.escape(run.name)}\S* \(epoch (\d+), step", pack_log)
        assert resumed and 1 <= int(resumed.group(1)) < 10, pack_log[-3000:]
        assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"] == list(range(1, 11))

    twin_output, _ = twins.communicate(timeout=hang_s())
    assert twins.returncode == 0, twin_output[-3000:]
    for run in (killed, other):
        twin = alone_results / "packed" / "runs" / run.name
        assert read_jsonl(twin / "attempts.jsonl")[0]["runtime"]["threads"] == 1
        assert read_jsonl(run / "attempts.jsonl")[0]["runtime"]["threads"] == 1
        assert step_losses(run) == step_losses(twin) and len(step_losses(run)) > 10
        assert json.loads((run / "probe.json").read_text())["top1"] == json.loads((twin / "probe.json").read_text())["top1"]


@pytest.mark.slow
def test_smoke_study_on_slurm_survives_a_killed_driver_and_retries_failed_trials(tmp_path, slurm):
    """The smoke grid on a real Slurm as one job array, every trial raising once
    (HARNESS_FAULT=raise-once), the driver SIGKILLed as soon as it has submitted: the rerun re-attaches
    to the array (nothing resubmitted), records each failure with its reason, retries each trial
    once, and ends with every trial complete exactly once. The grid at one seed: two trials make an
    array as four do."""
    fault = {"HARNESS_FAULT": "raise-once"}
    study = tmp_path / "file" / "smoke.yaml"
    study.parent.mkdir()
    study.write_text((ROOT / "studies" / "smoke.yaml").read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    keys = [key for key in SMOKE_KEYS if key.endswith("seed=0")]
    cmd, env = study_cmd(tmp_path, str(study), "--executor", "slurm", "--parallel", "2", slurm=slurm, env_extra=fault)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def submitted() -> bool:
        """A job id on a trial, read from the SQLite file read-only: Optuna's load_study would create
        the schema itself if the driver had not finished doing so, and the two creations collide
        ("table alembic_version already exists", seen once in the driver)."""
        assert driver.poll() is None, f"the driver ended before submitting:\n{log.read_text()[-3000:]}"
        db = tmp_path / "smoke" / "study.db"
        if not db.exists():
            return False
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                return con.execute("SELECT 1 FROM trial_user_attributes WHERE key = ? LIMIT 1",
                                   (record.JOB_ID,)).fetchone() is not None
        except sqlite3.OperationalError:  # no such table yet, or the file is locked while the driver writes
            return False

    try:
        wait_until(submitted, what="a submitted job")
    except AssertionError as exc:  # what the driver said, and what Slurm says
        queue = subprocess.run(["squeue"], env=slurm.env, capture_output=True, text=True).stdout
        raise AssertionError(f"{exc}\n--- driver:\n{log.read_text()[-3000:]}\n--- squeue:\n{queue}") from None
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    proc = run_study(tmp_path, str(study), "--executor", "slurm", "--parallel", "2", slurm=slurm, env_extra=fault)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = trials_of(tmp_path)
    assert_every_trial_complete_once(trials, keys)
    assert_jobs_ran_the_snapshot(tmp_path)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert sorted(t.user_attrs["key"] for t in failed) == keys and len(trials) == 4  # nothing resubmitted
    assert all("injected fault" in t.user_attrs["failure_reason"] for t in failed)
    first = {t.user_attrs["job_id"] for t in failed}
    assert len({j.split("_")[0] for j in first}) == 1 and all("_" in j for j in first)  # one array
    retried = {t.user_attrs["job_id"].split("_")[0] for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(sorted(retried))],
                           env=slurm.env, capture_output=True, text=True).stdout
    assert sacct.count("COMPLETED") == 2, sacct


PRUNING_STUDY = """\
description: TPE over tau with a pruner every trial fails
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=512, data.test_subset=256, optim.batch_size=64, optim.epochs=3,
            moco.queue_size=256, eval.pixel_floor=false, eval.knn_every=1]
sampler: tpe
n_trials: 1
factors: {moco.temperature: {type: float, low: 0.1, high: 0.3}}
seeds: [0]
pruner: {type: threshold, lower: 0.99}
retries: 0
"""


@pytest.mark.slow
def test_pruner_decision_stops_the_running_trial(tmp_path):
    """A search whose pruner (a kNN threshold no tiny run reaches) stops the trial after its first epoch."""
    study = tmp_path / "prune.yaml"
    study.write_text(PRUNING_STUDY)
    proc = run_study(tmp_path / "results", str(study), "--executor", "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'results' / 'prune' / 'study.db'}"
    (trial,) = optuna.load_study(study_name="prune", storage=storage).get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = tmp_path / "results" / "prune" / trial.user_attrs["run_dir"]
    logged = [r["knn_top1"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert trial.intermediate_values == {1: logged[0]}  # the kNN of epoch 1, as logged, reached the pruner
    assert json.loads((run / "status.json").read_text())["status"] == "pruned"
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"] == [1]
    assert not (run / "probe.json").exists()


def test_retries_run_out_and_the_study_ends_with_the_reason(tmp_path):
    """A trial that fails every time (retries: 1, so two attempts) ends FAIL with its reason; the
    driver stops instead of retrying for ever. The fault fires before training: no CPU spent."""
    study = tmp_path / "doomed.yaml"
    study.write_text("description: x\nrecipe: fmnist-tiny\noverrides: [data.train_subset=512]\n"
                     "factors: {moco.momentum: [0.99]}\nseeds: [0]\nretries: 1\n")
    proc = run_study(tmp_path / "res", str(study), "--executor", "local", env_extra={"HARNESS_FAULT": "raise-always"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = trials_of(tmp_path / "res", "doomed")
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("injected fault (HARNESS_FAULT=raise-always)" in t.user_attrs["failure_reason"] for t in trials)
    assert "done 0/1" in proc.stdout and "failed 2" in proc.stdout


def test_a_corrupt_study_db_is_a_clear_error_and_left_as_it_is(tmp_path, study_cli):
    (tmp_path / "smoke").mkdir()
    db = tmp_path / "smoke" / "study.db"
    db.write_bytes(b"not a database" * 100)
    proc = study_cli(tmp_path, "smoke", "--executor", "local")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "study.db" in proc.stderr and "not a database" in proc.stderr
    assert db.read_bytes() == b"not a database" * 100  # nothing computed is lost: the file is not replaced


def test_dry_run_estimates_the_cost_from_earlier_runs_of_the_same_work(tmp_path, study_cli):
    """The committed example's ten real runs, as if they had run on this machine: the dry run's
    estimate is their median wall time, times the rounds of `--parallel` trials; other work (another
    epoch count) has no measurement and says so."""
    import math
    import shutil
    import statistics

    from harness.training.runtime import machine_description

    shutil.copytree(ROOT / "results" / "examples" / "momentum_sweep" / "runs", tmp_path / "earlier" / "runs")
    walls = []
    for path in (tmp_path / "earlier" / "runs").rglob("attempts.jsonl"):
        (attempt,) = read_jsonl(path)
        path.write_text(json.dumps({**attempt, "machine": machine_description()}) + "\n")
        walls.append(json.loads((path.parent / "status.json").read_text())["updated"] - attempt["start"])
    args = ["momentum_sweep", "--dry-run", "--executor", "local", "--parallel", "2", "--set", "runtime.threads=1",
            "--no-share",  # the copied runs would be shared: nothing to train
            "--set", "eval.knn_every=1", "--set", "eval.knn_train_subset=null"]  # their monitor: the same work
    proc = study_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    per_trial = statistics.median(walls)
    assert (f"estimate: {per_trial / 60:.1f} min a trial (median of 10 earlier runs of this work here), 10 trials "
            f"2 at a time: about {math.ceil(10 / 2) * per_trial / 60:.0f} min of wall time") in proc.stdout
    cache = tmp_path / "cache"  # this test's own: other dry runs in this worker time steps of their own
    other = study_cli(tmp_path, *args, "--set", "optim.epochs=4", env={"HARNESS_CACHE": str(cache)})  # no earlier
    # run: a few steps timed here
    assert "estimate: no earlier run of this work on this machine" in other.stdout
    timed = re.search(r"timed here: ([0-9.]+) s a training step x 156 steps = ([0-9.]+) min a trial of training "
                      r"alone \(start-up, kNN monitor and probe not included\), 10 trials 2 at a time: at least "
                      r"([0-9]+) min", other.stdout)
    assert timed, other.stdout
    step = float(timed.group(1))
    assert 0 < step < 60 and timed.group(3) == f"{5 * 156 * step / 60:.0f}"
    cached = json.loads((cache / "step_seconds.json").read_text())
    assert [round(v, 3) for v in cached.values()] == [step]  # measured once per work, machine and threads
    again = study_cli(tmp_path, *args, "--set", "optim.epochs=8", env={"HARNESS_CACHE": str(cache)})  # same step,
    # other length: the cached step
    assert f"timed here: {step:.3f} s a training step x 312 steps" in again.stdout


def test_a_study_reuses_runs_another_study_finished_and_its_report_says_so(tmp_path, study_cli):
    """Runs are identified by what they compute: a study asking for four points the committed momentum
    sweep already finished (same config, same seeds) trains nothing — any job would fail here
    (HARNESS_FAULT=raise-always) — records the four results from those runs, links its run
    directories to them and says so in its report; one changed setting (epochs) shares nothing."""
    import shutil

    shutil.copytree(ROOT / "results" / "examples" / "momentum_sweep" / "runs", tmp_path / "earlier" / "runs")
    study = tmp_path / "again.yaml"
    study.write_text("description: the sweep's two middle levels again\nrecipe: fmnist-tiny\n"
                     "factors: {moco.momentum: [0.9, 0.99]}\nseeds: [0, 1]\nretries: 0\n")
    plan = study_cli(tmp_path, str(study), "--dry-run", "--executor", "local")
    assert "4 of the 4 trials are finished runs of other studies (shared): 0 to train" in plan.stdout, plan.stdout
    other = study_cli(tmp_path, str(study), "--dry-run", "--executor", "local", "--set", "optim.epochs=4")
    assert "0 of the 4 trials are finished runs of other studies" in other.stdout

    proc = study_cli(tmp_path, str(study), "--executor", "local", env={"HARNESS_FAULT": "raise-always"})
    assert proc.returncode == 0, proc.stderr
    trials = trials_of(tmp_path, "again")
    assert len(trials) == 4 and {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    for t in trials:
        key = t.user_attrs["key"]
        source = tmp_path / "earlier" / "runs" / key
        assert t.user_attrs["shared_from"] == f"earlier/runs/{key}" and "job_id" not in t.user_attrs
        assert t.value == json.loads((source / "probe.json").read_text())["top1"]
        link = tmp_path / "again" / "runs" / key
        assert link.is_symlink() and link.resolve() == source.resolve()
        assert f"{key}: shared: earlier/runs/{key} finished the same run" in proc.stdout
    report = (tmp_path / "again" / "report" / "report.md").read_text()
    assert "## Shared runs" in report and "4 of 4 trials were not trained here" in report


def test_committed_examples_are_not_shared_into_a_users_studies(tmp_path):
    """results/examples/ holds runs made elsewhere, to read: a study under results/ trains its own,
    unless HARNESS_RESULTS points at the examples themselves."""
    import shutil

    from harness.planning.shared import RunIndex
    from harness.run.config import config_from_dict

    run = ROOT / "results" / "examples" / "momentum_sweep" / "runs" / "momentum=0.99,seed=0"
    digest = config_from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text())).digest()
    copy = tmp_path / "results" / "examples" / "sweep" / "runs" / run.name
    shutil.copytree(run, copy)
    assert RunIndex(tmp_path / "results").find(digest) is None
    assert RunIndex(tmp_path / "results" / "examples").find(digest) == copy
    shutil.copytree(run, tmp_path / "results" / "mine" / "runs" / run.name)
    assert RunIndex(tmp_path / "results").find(digest) == tmp_path / "results" / "mine" / "runs" / run.name
    # The same run made twice, the first by path before the diagnostics existed: the one that has them
    older = tmp_path / "results" / "a_race" / "runs" / run.name
    shutil.copytree(run, older)
    metrics = older / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if "key_consistency" not in line))
    assert RunIndex(tmp_path / "results").find(digest) == tmp_path / "results" / "mine" / "runs" / run.name
    shutil.rmtree(tmp_path / "results" / "mine")
    assert RunIndex(tmp_path / "results").find(digest) == older  # the only one left


def test_a_driver_start_imports_no_torch(tmp_path):
    """`--status` and a driver's planning read study files, storage and JSON: torch (seconds to import,
    more on a cluster's shared file system) must not come in with them. `studyfile` once took
    `pretrain_size` from `harness.data`, which imports torch. Nor does a start that builds no report
    import the report's code (pandas); one that will build it imports it as it starts, not days later."""
    env = {**os.environ, "HARNESS_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness.study", "smoke", "--status"],
                          capture_output=True, text=True, timeout=hang_s(), env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"harness.planning.studyfile", "harness.execution.driver"} <= imported
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}
    assert not {name for name in imported if name.split(".")[0] == "pandas" or name.startswith("harness.reporting.")}
    from harness import study

    for argv, builds in ((["smoke"], True), (["smoke", "--no-report"], False), (["smoke", "--status"], False),
                         (["smoke", "--dry-run"], False)):
        args, opts = study.parse_args(argv)
        report = study.reporting(args, opts)
        assert (report is not None) == builds, argv
    from harness.reporting.study_report import build_report

    assert study.reporting(*study.parse_args(["smoke"])).study is build_report
