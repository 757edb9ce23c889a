"""Job states on a real Slurm as a busy cluster shows them: array tasks waiting on their throttle
(`%1`), held jobs, and a cluster whose accounting (slurmdbd) does not answer."""
import functools
import subprocess
import time

import local_slurm
from timing import wait_until

from harness.execution.executors import SlurmExecutor
from harness.execution.slurm import slurm_states
from harness.planning.studyfile import Resources

SLEEP = functools.partial(time.sleep, 60)  # a stdlib callable: the job unpickles it without test modules


def _squeue_state(slurm, job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%T", "-j", job_id], env=slurm.env, capture_output=True,
                         text=True)
    return out.stdout.strip()


def test_waiting_and_held_jobs_stay_alive_past_the_vanish_threshold_with_and_without_accounting(
        tmp_path, slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setenv("HARNESS_SLURM_VANISH_S", "0")  # a job no source knows would count as vanished at once
    executor = SlurmExecutor(tmp_path / "jobs", Resources(cpus=1, mem_gb=0.2, time_min=5), "waiting", parallel=1)
    code = tmp_path / "code"
    code.mkdir()
    array = [str(job.job_id) for job in executor.submit([SLEEP] * 3, code)]  # one array, %1: two tasks wait
    held = subprocess.run(["sbatch", "--parsable", "--hold", "-t", "5", "--wrap", "sleep 60"], env=slurm.env,
                          capture_output=True, text=True, check=True).stdout.strip()
    jobs = [*array, held]
    try:
        wait_until(lambda: _squeue_state(slurm, array[0]) == "RUNNING", "the array's first task to run")
        long_ago = {job_id: time.time() - 3600 for job_id in jobs}
        assert executor.ended(long_ago) == {}, slurm_states(jobs)  # sacct knows none of the waiting ones
        assert slurm_states(jobs)[array[1]] == "PENDING" and slurm_states(jobs)[held] == "PENDING"

        slurm.stop_daemon("slurmdbd")  # a site without accounting: sacct fails
        try:
            sacct = subprocess.run(["sacct", "-n", "-X", "-j", array[0]], env=slurm.env, capture_output=True, text=True)
            assert sacct.returncode != 0, sacct.stdout
            assert executor.ended(long_ago) == {}
            subprocess.run(["scancel", held], env=slurm.env, check=True)
            # An ended job is still known to the controller (MinJobAge): its real state, not "vanished".
            wait_until(lambda: held in executor.ended(long_ago), "the cancelled job to be seen as ended")
            assert executor.ended(long_ago)[held] == "CANCELLED"
        finally:
            local_slurm._run("slurmdbd", env=slurm.env)
            local_slurm._wait(lambda: slurm._port_open(slurm.dbd_port), "slurmdbd")
    finally:
        subprocess.run(["scancel", *[j.split("_")[0] for j in jobs]], env=slurm.env, capture_output=True)
