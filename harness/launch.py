"""submitit side: executors, the trial job a worker runs, and job states for re-attachment.

The job is a thin shell around `harness.train.train`: everything it needs to resume lives in the
run directory (config, checkpoints), so a requeued job (preemption, time limit) simply calls
train again, which resumes from the newest good checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit

from . import faults
from .snapshot import code_origin, restore_cwd
from .studyfile import Resources, StudyError

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


def resolve_executor(kind: str) -> str:
    """auto = slurm where a controller answers, else local."""
    if kind == "auto":
        return "local" if slurm_problem() else "slurm"
    if kind == "slurm":
        problem = slurm_problem()
        if problem:
            raise StudyError(f"--executor slurm: no SLURM here: {problem}. Use --executor local (or auto).")
    return kind


def make_executor(kind: str, folder: Path, res: Resources, name: str, parallel: int) -> submitit.Executor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind, slurm_max_num_timeout=res.max_timeouts)
    tasks = res.tasks or max(res.gpus, 1)  # one process per GPU: DDP
    params: dict[str, Any] = dict(name=name, timeout_min=res.time_min, nodes=res.nodes, tasks_per_node=tasks,
                                  cpus_per_task=max(1, res.cpus // tasks), gpus_per_node=res.gpus or None)
    if kind == "slurm":
        params.update(mem_gb=res.mem_gb, slurm_array_parallelism=parallel, slurm_signal_delay_s=res.signal_delay_s)
        if res.partition:
            params["slurm_partition"] = res.partition
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def sbatch_parameters(executor: submitit.Executor) -> dict[str, Any]:
    inner = getattr(executor, "_executor", executor)
    return dict(getattr(inner, "parameters", {}))


# ---------------------------------------------------------------- the job

class TrialJob(submitit.helpers.Checkpointable):
    """Pretrain + probe one trial. On preemption/timeout submitit requeues this same object;
    `train` resumes from the run directory's checkpoint, so no state travels in the pickle."""

    def __init__(self, run_dir: str, config: dict, storage_url: str, study_name: str, trial_id: int,
                 pruner: tuple | None, threads: int = 0):
        """`pruner`: (name, epochs, args) for studyfile.make_pruner, or None for no pruning."""
        self.run_dir, self.config, self.storage_url = run_dir, config, storage_url
        self.study_name, self.trial_id, self.pruner, self.threads = study_name, trial_id, pruner, threads

    def __call__(self) -> dict:
        from .config import config_from_dict
        from .train import train

        restore_cwd()
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # DDP across the job's tasks
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if env.global_rank == 0:
            with open(run_dir / "attempts.jsonl", "a") as fh:
                fh.write(json.dumps({"job_id": env.job_id, "host": socket.gethostname(), "start": time.time(),
                                     "machine": machine_description(), "code": code_origin()}) + "\n")
        cfg = config_from_dict(self.config)
        if self.threads:
            cfg.runtime.threads = self.threads
        faults.raise_point("raise-once", run_dir)
        # getattr: a job pickled by an older driver (one started before an upgrade) has no `pruner`
        callback = self._pruning_callback() if getattr(self, "pruner", None) and env.global_rank == 0 else None
        return train(cfg, run_dir, on_epoch=callback)

    def _pruning_callback(self):
        import optuna

        from .storage import open_storage
        from .studyfile import make_pruner

        study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage_url),
                                  pruner=make_pruner(*self.pruner))
        trial = optuna.trial.Trial(study, self.trial_id)

        def on_epoch(epoch: int, record: dict):
            if record.get("knn_top1") is None:
                return None
            trial.report(record["knn_top1"], step=epoch)
            return "prune" if trial.should_prune() else None

        return on_epoch


def machine_description() -> str:
    """CPU model and cores, GPUs, torch version: what a report says the numbers came from."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    gpu_text = f", {len(gpus)} x {gpus[0]}" if gpus else ", no GPU"
    return f"{cpu} ({cores} cores available to the job){gpu_text}, torch {torch.__version__}"


# ---------------------------------------------------------------- re-attachment

def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """One sacct call for all jobs (array tasks included): {job id: state}. Missing ids are absent."""
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted(set(job_ids)))],
                         capture_output=True, text=True, timeout=60)
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            job_id, state = line.split("|", 1)
            states[job_id.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


def local_alive(job_id: str) -> bool:
    """A local submitit job is its controller process: alive while that PID runs submitit."""
    try:
        pid = int(job_id)
        os.kill(pid, 0)
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False


def job_failure(kind: str, folder: Path, job_id: str, state: str) -> str:
    """Why a finished job left no final status: the remote exception's last line, or its state."""
    cls = submitit.SlurmJob if kind == "slurm" else submitit.local.local.LocalJob
    path = cls(folder=str(folder), job_id=job_id).paths.result_pickle
    if path.exists():
        try:
            outcome, value = submitit.core.utils.pickle_load(path)
        except Exception:  # a result file cut short: fall through to the state
            outcome, value = "unreadable", None
        if outcome == "error":
            lines = [line for line in str(value).strip().splitlines() if line.strip()]
            return lines[-1][:500] if lines else "the job raised"
    return f"the job ended in state {state} without a result"
