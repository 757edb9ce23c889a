"""Site-specific SLURM: the cluster knobs of `resources`, the user's cluster file, and what sbatch
refuses, on the test cluster that enforces accounts and QOS (tests/local_slurm.py)."""
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from test_study import PRUNING_STUDY
from timing import hang_s

from harness.execution.executors import SlurmExecutor
from harness.execution.slurm import explain_sbatch
from harness.planning.resources import Resources, check_resources
from harness.run.errors import StudyError

ROOT = Path(__file__).resolve().parents[2]

# What the job's own environment and cores are (a stdlib callable: nothing of the tests to unpickle).
REPORT = functools.partial(subprocess.check_output, ["sh", "-c", "echo SETUP=$HARNESS_SETUP_RAN OUTER=$SLURM_OUTER "
                                                     "CPT=$SLURM_CPUS_PER_TASK SRUN_CPT=$SRUN_CPUS_PER_TASK "
                                                     "CVD=$CUDA_VISIBLE_DEVICES NPROC=$(nproc)"], text=True)


def _study_file(tmp_path: Path, resources: dict, **changes) -> Path:
    data = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    data["resources"] = {**data["resources"], **resources}
    data.update(changes)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


EVERY_KNOB = {"account": "lab", "qos": "short", "partition": "long", "constraint": "a100", "gres": "gpu:2",
              "cpus": 2, "mem_gb": 1, "comment": "harness-test", "exclusive": True, "time_min": 5,
              "setup": ["export HARNESS_SETUP_RAN=yes"], "additional_parameters": {"hold": True},
              "srun_args": ["--cpu-bind=cores"]}


def test_the_knobs_are_checked_when_a_study_is_loaded():
    check_resources("s.yaml", EVERY_KNOB)
    for bad, field in (({"account": 3}, "resources.account"), ({"setup": "module load x"}, "resources.setup"),
                       ({"exclusive": "yes"}, "resources.exclusive"), ({"accuont": "lab"}, "resources"),
                       ({"additional_parameters": {"mem": "4G"}}, "resources.additional_parameters"),
                       ({"gres": "gpu:a100:8", "gpus": 4}, "resources.gres")):
        with pytest.raises(StudyError, match=re.escape(field)):
            check_resources("s.yaml", bad)
    assert Resources(gres="gpu:a100:8").gres_gpus() == 8 and Resources(gres="gpu").gres_gpus() == 1


def test_sbatch_refusals_are_one_line_naming_the_field():
    said = explain_sbatch("sbatch: error: Batch job submission failed: Invalid account or account/partition "
                          "combination specified\n")
    assert said.count("\n") == 0 and "resources.account" in said and "Invalid account" in said
    assert "resources.qos" in explain_sbatch("sbatch: error: Batch job submission failed: Invalid qos specification")
    assert "--parallel" in explain_sbatch("sbatch: error: QOSMaxSubmitJobPerUserLimit")


def test_dry_run_shows_the_sbatch_lines_sbatch_accepts_and_the_job_sees(tmp_path, slurm, study_cli, monkeypatch):
    """Every knob, from the study file and a cluster file: --dry-run prints the #SBATCH lines and where
    each value came from; the same parameters submitted are what `scontrol show job` reports, and
    the job sees its setup line, its own cores and GPUs, and none of the driver's allocation."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"resources": {"account": "lab", "setup": EVERY_KNOB["setup"]}}))
    knobs = {k: v for k, v in EVERY_KNOB.items() if k not in ("account", "setup")}
    study = _study_file(tmp_path, knobs)
    env = {"SLURM_CONF": str(slurm.conf), "HARNESS_CLUSTER": str(cluster)}
    plan = study_cli(tmp_path / "res", str(study), "--executor", "slurm", "--dry-run", env=env)
    assert plan.returncode == 0, plan.stderr
    lines = [line.strip() for line in plan.stdout.splitlines() if line.strip().startswith("#SBATCH")]
    for expected in ("--account=lab", "--qos=short", "--partition=long", "--constraint=a100", "--gres=gpu:2",
                     "--comment=harness-test", "--exclusive", "--mem=1GB", "--hold"):
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    assert "export HARNESS_SETUP_RAN=yes" in plan.stdout
    assert f"account 'lab' (cluster file {cluster})" in plan.stdout and f"qos 'short' (study file {study})" in plan.stdout

    # The same resources, submitted: what the controller holds, and what the job sees.
    from harness.planning.studyfile import load_study_file

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_OUTER", "driver-allocation")  # as inside salloc: must not reach the job
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "7")
    res = load_study_file(study, "site").resources_for()
    executor = SlurmExecutor(tmp_path / "jobs", res, "knobs", parallel=1)
    executor.preflight()
    (job,) = executor.submit([REPORT], tmp_path)
    try:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job.job_id.split("_")[0]], env=slurm.env,
                               capture_output=True, text=True, check=True).stdout
        fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
        assert (fields["Account"], fields["QOS"], fields["Partition"]) == ("lab", "short", "long")
        assert fields["Features"] == "a100" and fields["Comment"] == "harness-test"
        assert fields["OverSubscribe"] == "NO" and "gres:gpu:2" in fields.get("TresPerNode", "")
        assert fields["Reason"] == "JobHeldUser"  # additional_parameters: --hold reached sbatch
        subprocess.run(["scontrol", "release", job.job_id], env=slurm.env, check=True)
        outs = job.results()  # gres gpu:2 -> two GPUs, one rank (task) each
    finally:
        subprocess.run(["scancel", job.job_id], env=slurm.env, capture_output=True)
    assert len(outs) == 2
    for out in outs:
        seen = dict(item.split("=", 1) for item in out.split())
        assert seen["SETUP"] == "yes" and seen["OUTER"] == ""  # the setup line ran; the driver's allocation stayed out
        assert seen["CPT"] == "1" and seen["SRUN_CPT"] == "1" and seen["NPROC"] == "1"  # cpus 2 / 2 ranks, bound
        assert seen["CVD"] == "0,1"  # the node's two GRES GPUs


def test_cpus_per_gpu_reaches_sbatch_without_cpus_per_task(tmp_path, slurm, monkeypatch):
    """sbatch refuses --cpus-per-task together with --cpus-per-gpu: a study that says cpus_per_gpu
    writes only that, and the test cluster's `sbatch --test-only` accepts the script."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    executor = SlurmExecutor(tmp_path / "jobs", Resources(gpus=2, cpus_per_gpu=1, mem_gb=1, time_min=5), "cpg", parallel=1)
    lines = executor.sbatch_lines()
    assert "#SBATCH --cpus-per-gpu=1" in lines and not any("--cpus-per-task" in line for line in lines), lines
    executor.preflight()  # raises StudyError with sbatch's refusal


def test_a_wrong_account_is_one_line_before_any_trial_and_the_right_one_runs(tmp_path, slurm, study_cli):
    env = {"SLURM_CONF": str(slurm.conf), "HARNESS_CLUSTER": None}
    wrong = study_cli(tmp_path / "res", str(_study_file(tmp_path, {"account": "nosuch"})), "--executor", "slurm",
                      env=env)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    (line,) = [line for line in wrong.stderr.splitlines() if line.startswith("error:")]
    assert "Invalid account" in line and "resources.account" in line
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'res' / 'site' / 'study.db'}")
    assert all(not s.n_trials for s in optuna.get_all_study_summaries(storage))  # no trial asked, none FAIL
    qos = study_cli(tmp_path / "res2", str(_study_file(tmp_path, {"qos": "fast"})), "--executor", "slurm", env=env)
    assert qos.returncode == 2 and "resources.qos" in qos.stderr and "Traceback" not in qos.stderr
    # With the lab account and the short QOS (from a cluster file and the study), a trial runs to the end.
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"account": "lab"}))
    study = _study_file(tmp_path, {"qos": "short"}, factors={"moco.momentum": [0.9]}, seeds=[0])
    proc = subprocess.run([sys.executable, "-m", "harness.study", str(study), "--executor", "slurm", "--poll", "2",
                           "--no-report"], capture_output=True, text=True, timeout=hang_s(), cwd=ROOT,
                          env={**os.environ, **slurm.env, "HARNESS_RESULTS": str(tmp_path / "ok"),
                               "HARNESS_CLUSTER": str(cluster)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(next((tmp_path / "ok" / "site" / "runs").glob("*/status.json")).read_text())
    assert status["status"] == "completed"
    jobs = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "Account,QOS", "--name", "site"], env=slurm.env,
                          capture_output=True, text=True).stdout.split()
    assert jobs and set(jobs) == {"lab|short"}


DDP_PAIR = """description: one DDP trial of two ranks
recipe: fmnist-tiny
overrides: ["model.tiny_widths=[8,16,32]", data.train_subset=512, data.test_subset=256, optim.batch_size=64, optim.epochs=6, moco.queue_size=256,
            moco.bn_splits=4, moco.shuffle_bn=ddp, eval.pixel_floor=false, eval.knn_every=0, eval.probe=none,
            runtime.checkpoint_every=1, runtime.dist_timeout_s=60]
factors: {moco.momentum: [0.99]}
seeds: [0]
retries: 0   # only the requeue and the checkpoints may finish it
resources: {cpus: 2, tasks: 2, mem_gb: 2, time_min: 10}
"""


DDP_OPTIONS = ["--poll", "1", "--no-report", "--no-share"]  # the DDP trial's drivers, on Slurm and the reference


@pytest.fixture(scope="session")
def uninterrupted_ddp(tmp_path_factory):
    """DDP_PAIR's trial run uninterrupted by the local executor (2 ranks on this machine), then probed
    (evaluation is not part of what the trials compare): what the requeued DDP trials on Slurm and on
    two nodes must end with. Trained once, from the first test's start, while that test's own run goes
    on (its tests stay in the Slurm worker); each waits for it only when it reads it. Calling it gives
    the reference's run directory."""
    root = tmp_path_factory.mktemp("uninterrupted-ddp")
    (root / "local.yaml").write_text(DDP_PAIR.replace("eval.probe=none", "eval.probe=fast"))
    with open(root / "driver.err", "w") as err:
        reference = subprocess.Popen([sys.executable, "-m", "harness.study", str(root / "local.yaml"), *DDP_OPTIONS,
                                      "--executor", "local"], stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                     env={**os.environ, "HARNESS_CLUSTER": "", "HARNESS_RESULTS": str(root / "results")})

    def run() -> Path:
        assert reference.wait(timeout=hang_s()) == 0, (root / "driver.err").read_text()[-2000:]
        return root / "results" / "local" / "runs" / "momentum=0.99,seed=0"

    try:
        yield run
    finally:
        reference.kill()
        reference.wait()


def _requeued_ddp_run_equals_the_local_one(tmp_path: Path, study_text: str, slurm_env: dict, reference,
                                           prefix=()) -> Path:
    """Run the one-trial DDP study `study_text` on Slurm (the driver's command after `prefix`), requeue its
    job after the first checkpoint. Asserts it completes, every epoch ran once, and its final state is
    bit-identical (queue included) to the same trial uninterrupted (`reference`: uninterrupted_ddp).
    Returns the Slurm run's directory."""
    import torch

    from harness.run.runio import read_jsonl
    from harness.training import checkpoint as ckpt

    (tmp_path / "ddp.yaml").write_text(study_text)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_CLUSTER": "", **slurm_env,
           "HARNESS_RESULTS": str(tmp_path / "slurm"), "HARNESS_FAULT": "pace@2"}
    driver = subprocess.Popen([*prefix, sys.executable, "-m", "harness.study", str(tmp_path / "ddp.yaml"), *DDP_OPTIONS,
                               "--executor", "slurm"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "slurm" / "ddp" / "runs" / "momentum=0.99,seed=0"
    try:
        deadline = time.time() + hang_s()
        while not list((run / "checkpoints").glob("ckpt-*.pt")):
            assert driver.poll() is None and time.time() < deadline, "no checkpoint before the requeue"
            time.sleep(0.5)
        job_id = read_jsonl(run / "attempts.jsonl")[0]["job_id"]
        subprocess.run([*prefix, "scontrol", "requeue", job_id], env=slurm_env, check=True)
        out, _ = driver.communicate(timeout=hang_s())
    finally:
        driver.kill()
    assert driver.returncode == 0, out[-3000:]
    attempts = read_jsonl(run / "attempts.jsonl")
    assert len(attempts) >= 2 and all("(1 cores available to the job)" in a["machine"] for a in attempts)
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == list(range(1, 7))  # every epoch once, resumed mid-run
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["world_size"] == 2
    mine = ckpt.load_latest(run / "checkpoints")
    theirs = ckpt.load_latest(reference() / "checkpoints")
    assert mine["global_step"] == theirs["global_step"]
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])  # queue included
    return run


@pytest.mark.xdist_group("slurm")  # with the Slurm DDP tests: one uninterrupted_ddp for all
def test_a_trial_with_two_processes_runs_ddp_through_the_local_executor(uninterrupted_ddp):
    """resources.tasks: 2 with the local executor: submitit starts both ranks (gloo, keys shuffled across
    them by Shuffle BN 'ddp'); the trial completes at world size 2 and rank 0 probes it."""
    run = uninterrupted_ddp()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["world_size"] == 2
    assert json.loads((run / "probe.json").read_text())["protocol"] == "fast"


@pytest.mark.slow
def test_a_ddp_trial_launched_by_srun_resumes_on_both_ranks_after_a_requeue(tmp_path, slurm, uninterrupted_ddp):
    """resources.tasks: 2 on the real cluster: submitit's srun starts two ranks (gloo, Shuffle BN across
    them), each bound to its own core. `scontrol requeue` after the first checkpoint: both ranks start
    again and resume; the final state equals the same trial run uninterrupted by the local executor."""
    _requeued_ddp_run_equals_the_local_one(tmp_path, DDP_PAIR, slurm.env, uninterrupted_ddp)


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # with the test above: one uninterrupted_ddp for both
def test_a_two_node_ddp_trial_rendezvouses_from_the_allocation_and_resumes_after_a_requeue(tmp_path, two_nodes,
                                                                                         uninterrupted_ddp):
    """resources.nodes: 2 on a cluster of two slurmd, each in its own network namespace (tests/two_node_slurm.py):
    one rank per node, rendezvous at the allocation's first node by name (submitit's environment), gloo
    across the veth link, Shuffle BN across nodes. Requeued after the first checkpoint, it ends
    bit-identical to the same 2-rank trial on one machine."""
    two_node_study = DDP_PAIR.replace("{cpus: 2, tasks: 2,", "{cpus: 1, nodes: 2, tasks: 1,")
    assert two_node_study != DDP_PAIR
    run = _requeued_ddp_run_equals_the_local_one(tmp_path, two_node_study, two_nodes.env, uninterrupted_ddp,
                                                 prefix=two_nodes.exec())
    # Each attempt's two ranks ran on the two nodes (submitit's JobEnvironment line in each rank's log).
    logs = " ".join(p.read_text() for p in (run.parents[1] / "jobs").glob("*_log.out"))
    assert re.search(r"node=0\(2\), global_rank=0\(2\)", logs) and re.search(r"node=1\(2\), global_rank=1\(2\)", logs)


PRUNED = PRUNING_STUDY + "resources: {cpus: 1, mem_gb: 2, time_min: 10}\n"  # test_study's, on Slurm


@pytest.mark.slow
def test_pruning_on_slurm_goes_through_the_driver_and_jobs_never_open_the_storage(tmp_path, slurm):
    """The job writes epoch 1's kNN to its run directory and waits; the driver reports it to the pruner
    and writes back 'prune'; the job stops. The submitted job carries no storage URL at all."""
    import submitit

    from harness.run.runio import read_jsonl

    study = tmp_path / "prune.yaml"
    study.write_text(PRUNED)
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "harness.study", str(study), "--executor", "slurm", "--poll", "1",
                           "--no-report"], capture_output=True, text=True, timeout=hang_s(), cwd=ROOT,
                          env={**os.environ, **slurm.env, "HARNESS_RESULTS": str(results), "HARNESS_CLUSTER": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = optuna.load_study(study_name="prune", storage=f"sqlite:///{results / 'prune' / 'study.db'}").get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = results / "prune" / trial.user_attrs["run_dir"]
    logged = [r["knn_top1"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert trial.intermediate_values == {1: logged[0]} and len(logged) == 1  # stopped after epoch 1
    assert json.loads((run / "pruning" / "decision-00001.json").read_text())["prune"] is True
    (pickled,) = (results / "prune" / "jobs").glob("*_submitted.pkl")
    job = submitit.core.utils.pickle_load(pickled).function
    assert job.storage_url is None and job.relay_wait_s > 0


def test_a_filesystem_without_locks_is_one_line_naming_it(tmp_path, study_cli, monkeypatch):
    """Lustre mounted without -o flock answers flock with ENOSYS (it cannot be mounted here: the call
    is what is replaced). The driver says so, naming the filesystem, before any trial."""
    import errno
    import fcntl

    from harness.run import runio

    def no_locks(handle, flags):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(runio.fcntl, "flock", no_locks)
    proc = study_cli(tmp_path / "res", "smoke", "--executor", "local")
    monkeypatch.setattr(runio.fcntl, "flock", fcntl.flock)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not support file locks" in proc.stderr and runio.filesystem_of(tmp_path).split()[0] in proc.stderr


def test_a_grid_larger_than_max_array_size_is_submitted_as_several_arrays(tmp_path, slurm, monkeypatch):
    from harness.execution import executors as launch

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setattr(launch, "max_array_size", lambda: 2)
    executor = SlurmExecutor(tmp_path / "jobs", Resources(cpus=1, mem_gb=0.2, time_min=2), "split", parallel=3)
    jobs = executor.submit([functools.partial(time.sleep, 0)] * 3, tmp_path)
    try:
        assert len({job.job_id.split("_")[0] for job in jobs}) == 2 and all(job.result() is None for job in jobs)
    finally:
        subprocess.run(["scancel", *[job.job_id for job in jobs]], env=slurm.env, capture_output=True)


def test_the_ddp_rendezvous_port_is_the_jobs_own_and_below_the_ephemeral_range():
    """Every task of a DDP job derives rank 0's port from the job id. submitit's own choice falls
    mostly inside the range the node hands out to outgoing connections, and the evaluation test
    above failed once on it under load (EADDRINUSE before training)."""
    from harness.execution.jobs import master_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [master_port(str(job)) for job in range(2000)] + [master_port("1234_5")]
    assert all(20000 <= port < low for port in ports)
    assert master_port("29") == master_port("29") and len(set(ports)) > 1000  # one per job, spread


@pytest.mark.slow
def test_a_ddp_trial_frees_its_allocation_before_its_evaluation_job_which_resumes_after_a_requeue(tmp_path, slurm):
    """resources.eval on the real cluster: a 2-task DDP pretraining job ends (sacct: COMPLETED) before
    its evaluation job starts; that job, requeued while it waits after the standard probe's epoch 2,
    goes on from its saved state and ends with the probe an uninterrupted one gives."""
    import torch

    from harness.run.runio import read_jsonl
    from harness.training.probe import load_trained_encoder, probe_backbone

    study = DDP_PAIR.replace("optim.epochs=6", "optim.epochs=2").replace(
        "eval.probe=none", "eval.probe=standard, eval.probe_epochs=4, eval.probe_batch_size=64").replace(
        "resources: {cpus: 2, tasks: 2, mem_gb: 2, time_min: 10}",
        "resources: {cpus: 2, tasks: 2, mem_gb: 2, time_min: 10, eval: {cpus: 1, time_min: 10}}")
    (tmp_path / "ddp.yaml").write_text(study)
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "hold-probe-2").touch()  # the evaluation waits after its probe's epoch 2 until the requeue
    env = {**os.environ, **slurm.env, "PYTHONUNBUFFERED": "1", "HARNESS_CLUSTER": "",
           "HARNESS_RESULTS": str(tmp_path / "results"), "HARNESS_FAULT": f"hold@{gates}"}
    driver = subprocess.Popen([sys.executable, "-m", "harness.study", str(tmp_path / "ddp.yaml"), "--poll", "1",
                               "--no-report", "--no-share", "--executor", "slurm"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "results" / "ddp" / "runs" / "momentum=0.99,seed=0"
    state = run / "probe-standard-state" / "state.pt"
    try:
        deadline = time.time() + hang_s()
        while not state.exists():
            assert driver.poll() is None and time.time() < deadline, "the probe's epoch-2 state never appeared"
            time.sleep(0.5)
        trials = optuna.load_study(study_name="ddp", storage=f"sqlite:///{tmp_path / 'results' / 'ddp' / 'study.db'}").trials
        eval_job = trials[0].user_attrs["eval_job_id"]
        # The gate stays: the held attempt is killed by the requeue; the next one resumes after epoch 2.
        subprocess.run(["scontrol", "requeue", eval_job], env=slurm.env, check=True)
        out, _ = driver.communicate(timeout=hang_s())
    finally:
        driver.kill()
    assert driver.returncode == 0, out[-3000:]
    trial = optuna.load_study(study_name="ddp", storage=f"sqlite:///{tmp_path / 'results' / 'ddp' / 'study.db'}").trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and "resumed the standard probe after epoch 2 of 4" in \
        (tmp_path / "results" / "ddp" / "jobs-eval").joinpath(f"{eval_job}_0_log.out").read_text()
    assert len(read_jsonl(run / "attempts.jsonl")) == 1  # pretrained once
    accounting = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,Start,End", "-j",
                                 f"{trial.user_attrs['job_id']},{eval_job}"], env=slurm.env, capture_output=True,
                                text=True, check=True).stdout.split()
    rows = {line.split("|")[0]: line.split("|")[1:] for line in accounting}
    pretraining, evaluation = rows[trial.user_attrs["job_id"]], rows[eval_job]
    assert pretraining[0] == "COMPLETED" and evaluation[0] == "COMPLETED", rows
    assert pretraining[2] <= evaluation[1], rows  # the allocation was released before the evaluation began
    # The same probe, uninterrupted, here: the requeued one gave the same numbers.
    cfg, encoder, _ = load_trained_encoder(run, torch.device("cpu"))
    straight = probe_backbone(cfg, encoder.backbone, None, torch.device("cpu"), "standard")
    written = json.loads((run / "probe.json").read_text())
    assert written["top1_per_epoch"] == straight["top1_per_epoch"] and written["top1"] == straight["top1"]
