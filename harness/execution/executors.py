"""The driver side of submitit: executors (slurm, local, debug) and job states for re-attachment.

What runs inside a job is harness.execution.jobs; this module submits it and watches it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.local.local import LocalJob

from harness.execution import job_files
from harness.execution.slurm import ALIVE, explain_sbatch, max_array_size, outside_allocation, slurm_problem, slurm_states, vanish_seconds
from harness.planning.studyfile import Resources
from harness.run.errors import StudyError
from harness.run.snapshot import jobs_use


def resolve_executor(kind: str) -> str:
    """auto = slurm where a controller answers, else local."""
    if kind == "auto":
        return "local" if slurm_problem() else "slurm"
    if kind == "slurm":
        problem = slurm_problem()
        if problem:
            raise StudyError(f"--executor slurm: no SLURM here: {problem}. Use --executor local (or auto).")
    return kind


# ---------------------------------------------------------------- executors

class Executor:
    """Where trial jobs run. Subclasses say how jobs are submitted, whether one has ended, and why it
    failed; the driver needs nothing else of submitit."""

    kind = ""

    def __init__(self, folder: Path, res: Resources, name: str, parallel: int):
        self.folder, self.res, self.parallel = folder, res, parallel
        self.tasks = res.tasks or max(res.gpus, 1)  # one process per GPU: DDP
        python = {"slurm_python": res.python} if self.kind == "slurm" and res.python else {}
        self.inner = submitit.AutoExecutor(folder=str(folder), cluster=self.kind,
                                           slurm_max_num_timeout=res.max_timeouts, **python)
        # A gres string says the GPUs itself (some sites reject --gpus-per-node).
        gpus_per_node = None if res.gres else (res.gpus or None)
        # sbatch refuses --cpus-per-task together with --cpus-per-gpu: a site's cpus_per_gpu says it alone.
        cpus_per_task = None if res.cpus_per_gpu else max(1, res.cpus // self.tasks)
        params: dict[str, Any] = dict(name=name, timeout_min=res.time_min, nodes=res.nodes,
                                      tasks_per_node=self.tasks, cpus_per_task=cpus_per_task,
                                      gpus_per_node=gpus_per_node, **self.extra_parameters())
        self.inner.update_parameters(**{k: v for k, v in params.items() if v is not None})

    def extra_parameters(self) -> dict[str, Any]:
        return {}

    def preflight(self) -> None:
        """Raises StudyError for jobs this executor could not run, before any trial is asked."""

    def parameters(self) -> dict[str, Any]:
        """The job parameters as submitit will pass them (sbatch options on SLURM)."""
        inner = getattr(self.inner, "_executor", self.inner)
        return dict(getattr(inner, "parameters", {}))

    def submit(self, callables: list, code_dir: Path) -> list:
        """Jobs import the code snapshot `code_dir` (see harness.run.snapshot)."""
        with jobs_use(code_dir):
            return [self.inner.submit(fn) for fn in callables]

    def threads_per_process(self, concurrent: int) -> int:
        """CPU threads for each training process: its share of this machine's cores when
        `concurrent` trials share it."""
        return max(1, (os.cpu_count() or 1) // (concurrent * self.tasks))

    def ended(self, jobs: dict[str, float]) -> dict[str, str]:
        """{job id: submission time} -> {job id: final state} of the jobs that have ended."""
        raise NotImplementedError

    def failure(self, job_id: str, state: str, key: str | None = None) -> str:
        """Why a job that ended left no final status: the remote exception's last line, or its state.
        `key`: the trial, in a packed job."""
        return self.job_exception(job_id, key) or f"the job ended in state {state} without a result"

    def job_exception(self, job_id: str, key: str | None = None) -> str | None:
        """The last line of the exception a job raised, from submitit's result file (None: none); for a
        trial of a packed job, the reason the job recorded for it."""
        path = self.job(job_id).paths.result_pickle
        if not path.exists():
            return None
        try:
            outcome, value = job_files.load(path)
        except Exception:  # a result file cut short: no exception to report
            return None
        if outcome == "success" and isinstance(value, dict):
            return value.get(key)
        if outcome != "error":
            return None
        lines = [line for line in str(value).strip().splitlines() if line.strip()]
        return lines[-1][:500] if lines else "the job raised"

    def job(self, job_id: str):
        raise NotImplementedError


# srun of Slurm 22.05-23.02 no longer takes --cpus-per-task from the allocation: each rank would get one core.
SRUN_CPUS = "export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}"


class SlurmExecutor(Executor):
    kind = "slurm"

    def extra_parameters(self) -> dict[str, Any]:
        r = self.res
        jobs_at_once = max(1, self.parallel // r.trials_per_job)  # --parallel counts trials
        memory = ({"slurm_mem_per_gpu": f"{r.mem_per_gpu:g}G"} if r.mem_per_gpu
                  else {"slurm_mem": "0"} if r.mem_gb == 0 else {"mem_gb": r.mem_gb})  # --mem=0: the whole node
        site = dict(account=r.account, qos=r.qos, constraint=r.constraint, exclude=r.exclude, gres=r.gres,
                    gpus_per_task=r.gpus_per_task, cpus_per_gpu=r.cpus_per_gpu, comment=r.comment,
                    exclusive=True if r.exclusive else None, srun_args=list(r.srun_args) or None,
                    additional_parameters=dict(r.additional_parameters) or None)
        return dict(**memory, slurm_array_parallelism=jobs_at_once, slurm_signal_delay_s=r.signal_delay_s,
                    slurm_partition=r.partition, slurm_setup=[SRUN_CPUS, *r.setup],
                    **{f"slurm_{k}": v for k, v in site.items() if v is not None})

    def sbatch_lines(self) -> list[str]:
        """The job script's #SBATCH lines and setup, as submitit writes them (what --dry-run shows)."""
        inner: Any = self.inner._executor  # submitit's private API: the script it would submit
        text = inner._make_submission_file_text(inner._submitit_command_str, "dry-run")
        return [line for line in text.splitlines() if line.startswith("#SBATCH")
                or line in [SRUN_CPUS, *self.res.setup]]

    def preflight(self) -> None:
        """`sbatch --test-only` of the study's job script: an account, QOS, partition or size the site
        refuses is one StudyError naming the field, before any trial is asked or submitted."""
        inner: Any = self.inner._executor
        with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
            fh.write(inner._make_submission_file_text("true", "preflight"))
        try:
            with outside_allocation():
                out = subprocess.run(["sbatch", "--test-only", fh.name], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return  # a slow controller: the real submission says what is wrong, if anything
        finally:
            os.unlink(fh.name)
        if out.returncode != 0:
            raise StudyError(explain_sbatch(out.stderr))

    def submit(self, callables: list, code_dir: Path) -> list:
        """One job array per MaxArraySize tasks, submitted with a clean environment: a driver started
        inside an allocation (salloc, a job) must not pass its SLURM_* variables on to its jobs."""
        size = max_array_size()
        jobs = []
        try:
            with jobs_use(code_dir), outside_allocation():
                for lo in range(0, len(callables), size):
                    with self.inner.batch():  # one job array
                        jobs += [self.inner.submit(fn) for fn in callables[lo:lo + size]]
        except submitit.core.utils.FailedJobError as exc:
            raise StudyError(explain_sbatch(str(exc))) from None
        return jobs

    def threads_per_process(self, concurrent: int) -> int:
        return max(1, self.res.cpus // (self.tasks * self.res.trials_per_job))  # the job's own CPUs, shared

    def ended(self, jobs: dict[str, float]) -> dict[str, str]:
        states = slurm_states(list(jobs))
        out = {}
        for job_id, submitted in jobs.items():
            state = states.get(job_id, "UNKNOWN")
            # A fresh submission may not be known to any source yet; one unknown to all of them
            # (sacct, squeue, scontrol) for VANISH_S has vanished.
            if state in ALIVE or (state == "UNKNOWN" and time.time() - submitted < vanish_seconds()):
                continue
            out[job_id] = "UNKNOWN to sacct, squeue and scontrol" if state == "UNKNOWN" else state
        return out

    def job(self, job_id: str):
        return submitit.SlurmJob(folder=str(self.folder), job_id=job_id)


class LocalExecutor(Executor):
    """Jobs as processes on this machine. Trials with GPUs get GPUs of their own: `parallel` slots of
    `resources.gpus` devices each, a slot given to one job at a time (CUDA_VISIBLE_DEVICES)."""

    kind = "local"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, Any] = {}  # submitted by this driver: their exit codes can be read
        self.slots, self.gpu_problem = [], None
        if self.res.gpus:
            try:
                self.slots = gpu_slots(self.res.gpus, self.parallel, visible_gpus())
            except StudyError as exc:  # said by preflight (a run) or noted (a dry run)
                self.gpu_problem = str(exc)
        self.slot_of: dict[str, tuple[int, ...]] = {}  # job id -> its GPUs

    def preflight(self) -> None:
        if self.gpu_problem:
            raise StudyError(self.gpu_problem)

    def submit(self, callables: list, code_dir: Path) -> list:
        self.preflight()
        if not self.slots:
            jobs = super().submit(callables, code_dir)
        else:
            jobs = []
            with jobs_use(code_dir):
                for fn in callables:
                    slot = self._free_slot()
                    # submitit's LocalExecutor sets CUDA_VISIBLE_DEVICES from it (AutoExecutor does not pass it on)
                    self.inner._executor.update_parameters(visible_gpus=slot)
                    job = self.inner.submit(fn)
                    self.slot_of[str(job.job_id)] = slot
                    self.jobs[str(job.job_id)] = job
                    jobs.append(job)
        self.jobs.update({str(job.job_id): job for job in jobs})
        return jobs

    def _alive(self, job_id: str) -> bool:
        """Ours: the Popen says (a child just started may not have exec'd submitit yet); else by PID."""
        process = getattr(self.jobs.get(job_id), "_process", None)
        return process.poll() is None if process is not None else local_alive(job_id)

    def _free_slot(self) -> tuple[int, ...]:
        taken = {slot for job_id, slot in self.slot_of.items() if self._alive(job_id)}
        for slot in self.slots:
            if slot not in taken:
                return slot
        raise StudyError(f"the local executor has no free GPUs for another job: {len(self.slots)} slot(s) of "
                         f"{self.res.gpus} GPU(s) are all in use; lower --parallel.")

    def ended(self, jobs: dict[str, float]) -> dict[str, str]:
        return {job_id: "ENDED" for job_id in jobs if not local_alive(job_id)}

    def failure(self, job_id: str, state: str, key: str | None = None) -> str:
        exception = self.job_exception(job_id, key)
        if exception:
            return exception
        process = getattr(self.jobs.get(job_id), "_process", None)  # submitit's Popen of the job
        code = process.poll() if process is not None else None
        if code is not None and code < 0:
            return f"killed by signal {signal.Signals(-code).name}: the job ended without a result or an error"
        return ("the job ended without a result or an error: killed (a signal, out of memory or a restart of "
                "the machine)" + ("" if process is not None else "; it was started by an earlier driver"))

    def job(self, job_id: str):
        return LocalJob(folder=str(self.folder), job_id=job_id)


class DebugExecutor(Executor):
    """In the driver's own process, one job at a time: for pdb."""

    kind = "debug"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors: dict[str, str] = {}

    def submit(self, callables: list, code_dir: Path) -> list:
        jobs = [self.inner.submit(fn) for fn in callables]  # the live code: debugging is about it
        for job in jobs:
            try:
                job.result()
            except Exception as exc:  # recorded as the job's failure reason
                self.errors[str(job.job_id)] = f"{type(exc).__name__}: {exc}"[:500]
        return jobs

    def ended(self, jobs: dict[str, float]) -> dict[str, str]:
        return {job_id: "FINISHED" for job_id in jobs}  # ran inside submit

    def failure(self, job_id: str, state: str, key: str | None = None) -> str:
        return self.errors.get(job_id, "the job ended without a final status (or ran in an earlier driver)")


EXECUTORS = {cls.kind: cls for cls in (SlurmExecutor, LocalExecutor, DebugExecutor)}


def make_executor(kind: str, folder: Path, res: Resources, name: str, parallel: int) -> Executor:
    return EXECUTORS[kind](folder, res, name, parallel)


# ---------------------------------------------------------------- devices


def visible_gpus() -> list[int]:
    """The GPUs this machine shows to its processes, without importing torch (the driver stays light):
    CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list, else none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:  # the jobs' CUDA_VISIBLE_DEVICES names these same devices (submitit sets it)
        ids = [d.strip() for d in listed.split(",") if d.strip()]
        ids = ids[:next((i for i, d in enumerate(ids) if d == "-1"), len(ids))]  # CUDA stops at -1
        if not all(d.isdigit() for d in ids):
            raise StudyError(f"CUDA_VISIBLE_DEVICES={listed!r}: the local executor hands out GPUs by index; "
                             f"give indices (e.g. 0,1) instead of UUIDs.")
        return [int(d) for d in ids]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return []
    return list(range(sum(line.startswith("GPU ") for line in out.stdout.splitlines())))


def gpu_slots(per_job: int, parallel: int, gpus: list[int]) -> list[tuple[int, ...]]:
    """`parallel` disjoint sets of `per_job` GPUs, or a StudyError saying what is missing."""
    if not gpus:
        raise StudyError(f"resources.gpus: {per_job} GPU(s) a trial, and this machine shows 0 (CUDA_VISIBLE_DEVICES "
                         f"or nvidia-smi): use --executor slurm, or resources.gpus: 0 to train on the CPU.")
    if per_job * parallel > len(gpus):
        raise StudyError(f"resources.gpus: {parallel} trial(s) at once x {per_job} GPU(s) need {per_job * parallel} "
                         f"GPUs, and this machine shows {len(gpus)} (CUDA_VISIBLE_DEVICES or nvidia-smi); lower "
                         f"--parallel to {len(gpus) // per_job if per_job <= len(gpus) else 0}"
                         f"{'' if per_job <= len(gpus) else ' and resources.gpus'}, or use --executor slurm.")
    return [tuple(gpus[i * per_job:(i + 1) * per_job]) for i in range(parallel)]


def local_alive(job_id: str) -> bool:
    """A local submitit job is its controller process: alive while that PID runs submitit."""
    try:
        pid = int(job_id)
        os.kill(pid, 0)
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False
