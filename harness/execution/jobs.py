"""The job side of submitit: what runs inside a job (one trial, or several packed in one job).

The job is a thin shell around `harness.execution.trial.run_trial`: everything it needs to resume
lives in the run directory (config, checkpoints), so a requeued job (preemption, time limit) simply
runs the trial again, which resumes from the newest good checkpoint. A packed job
(`resources.trials_per_job`) runs several trials, one process each, on one job's CPUs and device.
The driver side (executors, job states) is harness.execution.executors; it never runs in a job.
"""
from __future__ import annotations

import dataclasses
import os
import random
import select
import signal
import threading
from pathlib import Path

import submitit

from harness.execution.pruning_relay import RelayReporter
from harness.execution.trial import PruningReporter, TrialSpec, run_trial
from harness.run import runio
from harness.run.config import RunConfig
from harness.run.outcome import Outcome
from harness.run.process import start_up, torch_forkserver
from harness.run.snapshot import restore_cwd

TRAINING = "harness.training.pretrain"  # what a trial imports before it trains (harness.execution.trial)

# ---------------------------------------------------------------- the job

class TrialJob(submitit.helpers.Checkpointable):
    """Pretrain + probe one trial. On preemption/timeout submitit requeues this same object;
    `run_trial` resumes from the run directory's checkpoint, so no state travels in the pickle."""

    def __init__(self, spec: TrialSpec, storage_url: str | None, study_name: str, trial_id: int,
                 pruner: tuple | None, threads: int = 0, relay_wait_s: float | None = None, probe: bool = True):
        """`pruner`: (name, epochs, args) for studyfile.make_pruner, or None for no pruning.
        `relay_wait_s`: pruning goes through the run directory to the driver (harness.execution.pruning_relay),
        which answers within this many seconds; the job never opens the storage (`storage_url` None).
        None: the job reports to the storage itself (a driver that does not wait, --no-wait)."""
        self.spec, self.storage_url, self.study_name = spec, storage_url, study_name
        self.trial_id, self.pruner, self.threads = trial_id, pruner, threads
        self.relay_wait_s = relay_wait_s
        self.probe = probe  # False: the job ends with pretraining; the driver submits the evaluation (EvalJob)

    def __call__(self) -> str:
        restore_cwd()
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # DDP across the job's tasks
            rendezvous = submitit.helpers.TorchDistributedEnvironment()
            if "MASTER_PORT" not in os.environ:  # one the user set is submitit's to use
                rendezvous.master_port = master_port(env.job_id)
            rendezvous.export(set_cuda_visible_devices=False)
        reporter = None
        if self.pruner and env.global_rank == 0:
            # Older format: jobs pickled before the relay (b02cb9e, 2026-12-01) report themselves; can go with them.
            relay_wait_s = getattr(self, "relay_wait_s", None)
            reporter = RelayReporter(self.spec.run_dir, relay_wait_s) if relay_wait_s else self._reporter()
        # Older format: jobs pickled before evaluation jobs (issue 37) probe in the job; can go with them.
        result = run_trial(self.spec, self.threads, reporter, attempt={"job_id": env.job_id},
                           probe=getattr(self, "probe", True))
        return result.outcome.value

    def _reporter(self) -> PruningReporter:
        storage_url, pruner = self.storage_url, self.pruner
        assert storage_url is not None and pruner is not None  # a job that reports itself was given both

        def open_trial():  # on the first report: a database down at the job's start costs no training
            import optuna

            from harness.execution.optuna_adapter import trial_handle
            from harness.execution.storage import open_storage
            from harness.planning.studyfile import make_pruner

            study = optuna.load_study(study_name=self.study_name, storage=open_storage(storage_url, None),
                                      pruner=make_pruner(*pruner))
            return trial_handle(study, self.trial_id)

        return PruningReporter(open_trial)


def master_port(job_id: str) -> int:
    """The rank-0 rendezvous port of a DDP job, the same on every task (drawn from the job id).
    submitit draws it from 20000-60000, mostly inside Linux's ephemeral range (32768-60999), where any
    outgoing connection on the node may already hold it: the job then fails with EADDRINUSE before
    training (seen on the local Slurm under load). Below that range only listening services compete."""
    return random.Random(job_id).randint(20000, 32767)


class PackedJob(submitit.helpers.Checkpointable):
    """Several trials in one job: one process per trial (its own run directory, threads, checkpoints
    and pruning reports), on the job's CPUs and device, so packing changes nothing a trial computes.
    Requeued (preemption, time limit), it starts again only the trials whose run has not ended, and
    each resumes from its checkpoint. A trial that fails does not stop the others; its reason is the
    job's result, and the driver retries it in a job of its own."""

    def __init__(self, members: list[TrialJob]):
        self.members = members
        self._processes: list = []

    def __getstate__(self) -> dict:  # processes are this attempt's, never pickled with a requeue
        return {**self.__dict__, "_processes": []}

    def __call__(self) -> dict[str, str | None]:
        restore_cwd()
        # Each trial forks from a server that imported torch and the training code once, and never ran
        # them: its own threads, device and state, without a torch start-up per trial.
        context = torch_forkserver(TRAINING)
        reasons = context.SimpleQueue()
        todo = [m for m in self.members if not _ended(m.spec.run_dir)]
        self._processes = [context.Process(target=_run_member, args=(m, reasons, os.getpid()), name=m.spec.key)
                           for m in todo]
        for process in self._processes:
            process.start()
        for process in self._processes:
            process.join()
        failures = {}
        while not reasons.empty():
            key, reason = reasons.get()
            failures[key] = reason
        for process in self._processes:
            if process.exitcode and process.name not in failures:
                how = (f"killed by signal {signal.Signals(-process.exitcode).name}" if process.exitcode < 0
                       else f"exited with code {process.exitcode}")
                failures[process.name] = f"the trial's process in the packed job was {how}"
        return {m.spec.key: failures.get(m.spec.key) for m in self.members}

    def checkpoint(self, *args, **kwargs):
        """On preemption or time limit: stop the trials (each keeps its last checkpoint), then requeue."""
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(timeout=30)
        return super().checkpoint(*args, **kwargs)


def _ended(run_dir) -> bool:
    return runio.read_status(run_dir).get("status") in (Outcome.COMPLETED, Outcome.DIVERGED, Outcome.PRUNED)


def _run_member(member: TrialJob, reasons, job_pid: int) -> None:
    """One packed trial, in its own process. Signals are the job's to handle, as for an unpacked
    trial (submitit's handler in the job process stops this one in `checkpoint`), and the trial dies
    with its job: a job SIGKILLed leaves no trial training on its own."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # submitit bypasses it: Slurm's SIGKILL follows
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    _die_with(job_pid)
    try:
        member()
    except BaseException as exc:
        reasons.put((member.spec.key, f"{type(exc).__name__}: {exc}"[:500]))
        raise


def _die_with(job_pid: int) -> None:
    """SIGKILL this process when the job's process ends, however it ends. The trial is the fork
    server's child, not the job's: the kernel's parent-death signal would wait for the server, and
    the server waits for its children."""
    try:
        job = os.pidfd_open(job_pid)
    except ProcessLookupError:  # already gone
        os.kill(os.getpid(), signal.SIGKILL)
        return
    except (OSError, AttributeError):  # no pidfd (not Linux 5.3+): on SLURM the job's end still stops it (cgroup)
        return

    def wait() -> None:
        select.select([job], [], [])  # readable once the process has ended
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="die-with-job", daemon=True).start()


def pack(jobs: list[TrialJob], size: int) -> list:
    """Trial jobs in packs of `size` (the last may be smaller); a pack of one is the trial's own job."""
    packs = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    return [p[0] if len(p) == 1 else PackedJob(p) for p in packs]


def members(job) -> list[TrialJob]:
    return job.members if isinstance(job, PackedJob) else [job]




class EvalJob(submitit.helpers.Checkpointable):
    """An evaluation protocol on a finished run, as a job of its own: loads the run's last
    checkpoint and probes it (harness.training.probe.probe_run), never trains. Requeued
    (preemption, time limit), the standard probe goes on from its last epoch's state."""

    def __init__(self, run_dir: str, protocol: str, threads: int = 0, evaluation: dict | None = None,
                 epoch: int | None = None):
        """`evaluation`: the eval section to probe with (the trial's, which may differ from the one in
        the run's config.yaml: evaluation is not part of a run's identity); None: config.yaml's.
        `epoch`: the checkpoint kept at that epoch (runtime.keep_epochs); None: the last."""
        self.run_dir, self.protocol, self.threads, self.evaluation = run_dir, protocol, threads, evaluation
        self.epoch = epoch

    @classmethod
    def of(cls, run_dir: Path, cfg: RunConfig, threads: int = 0, protocol: str | None = None,
           epoch: int | None = None) -> EvalJob:
        """`cfg`'s probe (or `protocol` with cfg's settings for it) on the run in `run_dir`."""
        return cls(str(Path(run_dir).resolve()), protocol or cfg.eval.probe, threads, dataclasses.asdict(cfg.eval), epoch)

    def __call__(self) -> str:
        restore_cwd()
        from harness.run import evaluations, faults
        from harness.run.config import config_from_dict, with_overrides

        run_dir = Path(self.run_dir)
        faults.raise_point("evaluate", run_dir)  # an injected failure costs no torch start-up
        with start_up():  # this job's process: what it imports now lives until it exits
            from harness.training.probe import load_trained_moco, probe_run, probe_settings
            from harness.training.runtime import Runtime
        cfg, model, epoch = load_trained_moco(run_dir, getattr(self, "epoch", None))
        evaluation = getattr(self, "evaluation", None)  # older format: jobs pickled before 2026-12-03 have none
        if evaluation is not None:
            cfg = config_from_dict({**cfg.to_dict(), "eval": evaluation})
        if evaluations.find(run_dir, probe_settings(cfg, self.protocol, epoch)) is not None:  # a requeued pack's finished member
            return f"{self.protocol}: already evaluated"
        here = with_overrides(cfg, [f"runtime.threads={self.threads}"] if self.threads else [])
        device = Runtime.for_config(here).apply().device
        result = probe_run(cfg, run_dir, model.encoder_q.to(device), None, device, self.protocol, epoch)
        return f"{self.protocol} top-1 {result['top1']:.4f}"


class EvalJobs(submitit.helpers.Checkpointable):
    """Several evaluations in one job, one after another in its process (resources.eval.trials_per_job):
    a probe is small next to a pretraining. One that fails does not stop the others; its reason is the
    job's result for its run directory. Requeued, the finished ones are skipped, the standard probe
    in progress goes on from its last epoch."""

    def __init__(self, members: list[EvalJob]):
        self.members = members

    def __call__(self) -> dict[str, str | None]:
        failures: dict[str, str | None] = {}
        for member in self.members:
            try:
                member()
                failures[member.run_dir] = None
            except Exception as exc:
                failures[member.run_dir] = f"{type(exc).__name__}: {exc}"[:500]
        return failures


def pack_evaluations(jobs: list[EvalJob], size: int) -> list:
    """Evaluations in packs of `size`; a pack of one is the evaluation's own job."""
    packs = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    return [p[0] if len(p) == 1 else EvalJobs(p) for p in packs]
