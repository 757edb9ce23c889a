"""What the driver asks of Slurm itself: whether a controller answers, the states of jobs (squeue,
then sacct, then scontrol: busy sites answer in different ways), sbatch's refusals in the words of
the field to change, and the environment a job is submitted from."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess

import submitit

ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
         "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}


def slurm_problem() -> str | None:
    """None when a Slurm controller answers here; otherwise what is missing."""
    if not (shutil.which("sbatch") and shutil.which("srun") and shutil.which("sinfo")):
        return "sbatch/srun are not on PATH"
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        return f"the Slurm controller does not answer (sinfo: {lines[-1] if lines else probe.returncode})"
    return None


SBATCH_CAUSES = (  # sbatch's words -> the field to change
    ("invalid account", "resources.account: the site does not know this account for you (sacctmgr show assoc "
                        "user=$USER lists yours)"),
    ("invalid qos", "resources.qos: not a QOS this account may use (sacctmgr show assoc user=$USER format=qos)"),
    ("invalid partition", "resources.partition: no such partition here (sinfo -s lists them)"),
    ("maxsubmit", "the site's limit on queued jobs: lower --parallel, or wait for jobs to end"),
    ("qosmax", "a QOS limit (jobs, GPUs or time per user): lower --parallel, resources.gpus or time_min, or use "
               "another resources.qos"),
    ("accounting/qos policy", "a QOS or account limit: lower --parallel, resources.gpus or time_min, or use another "
                              "resources.qos"),
    ("time limit", "resources.time_min: above the partition's or QOS's limit (sinfo -o '%P %l')"),
    ("gres", "resources.gres / resources.gpus: not a GRES this site has (sinfo -o '%P %G')"),
    ("feature", "resources.constraint: no node has these features (sinfo -o '%N %f')"),
    ("memory", "resources.mem_gb / mem_per_gpu: more memory than a node has"),
    ("node configuration is not available", "resources: no node has this many cpus, GPUs or this much memory "
                                            "(or constraint/exclude leave none)"),
    ("job array", "the job array is larger than the site's MaxArraySize"),
)


@contextlib.contextmanager
def outside_allocation():
    """submitit's clean_env (no SLURM_* or SUBMITIT_* variables of a surrounding allocation reach the
    jobs), keeping SLURM_CONF: where the Slurm client finds its cluster, not a property of a job."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        yield


def explain_sbatch(stderr: str) -> str:
    """One line: what sbatch said, and the field to change."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "no message")
    cause = next((fix for words, fix in SBATCH_CAUSES if words in said.lower()), None)
    return f"sbatch refused the job: {said.removeprefix('sbatch: error: ')}" + (f" -> {cause}" if cause else "")


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """The largest job array this site takes (scontrol show config: MaxArraySize; 1001 by default)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1000
    for line in out.splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            with contextlib.suppress(ValueError):
                return max(1, int(line.split("=", 1)[1].strip()))  # submitit's indices: 0..n-1 < MaxArraySize
    return 1000


def vanish_seconds() -> float:
    """How long a job no source knows counts as just submitted (HARNESS_SLURM_VANISH_S; tests shorten it)."""
    return float(os.environ.get("HARNESS_SLURM_VANISH_S", "300"))


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} for jobs and array tasks, from every source that knows them: sacct (accounting,
    also for ended jobs), then squeue for what sacct does not know (a pending array task has no
    accounting record until it starts; sites without slurmdbd have none at all), then scontrol for
    recently ended jobs on such sites. Ids no source knows are absent."""
    if not job_ids:
        return {}
    wanted = sorted(set(job_ids))
    states = {k: v for k, v in _sacct(wanted).items() if v != "UNKNOWN"}
    missing = [j for j in wanted if j not in states]
    if missing:
        states.update({k: v for k, v in _squeue(missing).items() if k in missing})
    for job_id in [j for j in missing if j not in states]:
        state = _scontrol(job_id)
        if state:
            states[job_id] = state
    return states


def _job_table(command: list[str]) -> dict[str, str]:
    """{job id: first word of its state} from `JobID|State` lines; {} when the command fails."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        if "|" in line:
            job_id, state = line.split("|", 1)
            states[job_id.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


def _sacct(job_ids: list[str]) -> dict[str, str]:
    return _job_table(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)])


def _squeue(job_ids: list[str]) -> dict[str, str]:
    """Pending and running jobs, array tasks one by one (-r: a throttled range ID_[a-b%N] expanded)."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    return _job_table(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)])


def _scontrol(job_id: str) -> str | None:
    """A job the controller still holds (ended ones for MinJobAge, 300 s by default)."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for field in out.stdout.split() if out.returncode == 0 else []:
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None
