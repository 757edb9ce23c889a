"""One MoCo pretraining run: `python -m harness.train --recipe R [--set k=v ...] [--out DIR] [--resume]`.

The run directory is the whole interface to the rest of the harness:
  config.yaml     the resolved configuration
  metrics.jsonl   one JSON object per epoch (and per logged step)
  checkpoints/    atomic checkpoints; the newest good one is resumed automatically
  status.json     running | completed | diverged | pruned, with the final figures
  probe-*.json    linear-probe results, each with its settings (harness.run.evaluations)
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.data.datasets import NUM_CLASSES, folder_classes, load_tensors, pretrain_views
from harness.model import distributed as dist_mod
from harness.run import evaluations, faults, runio
from harness.run.config import RUNTIME_ONLY, RunConfig, dump_yaml, get_dotted, identity_diff
from harness.run.errors import ConfigError
from harness.run.outcome import RUNNING, Outcome
from harness.run.snapshot import code_origin
from harness.run.validation import validate
from harness.training import checkpoint as ckpt
from harness.training import diagnostics
from harness.training.features import encoder_features, extract_split
from harness.training.knn import knn_accuracy
from harness.training.probe import probe_run, probe_settings  # imported up front: a long run must not load newer code at its end
from harness.training.runtime import Runtime, machine_description
from harness.training.step import build_step, learning_rate

EpochCallback = Callable[[int, dict], bool]  # after each epoch: True stops the run (pruned)


class Progress:
    """A progress bar on a terminal, plain log lines otherwise (SLURM logs stay readable)."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.enabled = enabled

    def advance(self, done: int, text: str | None) -> None:
        if self.bar is not None:
            self.bar.n = done
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        elif self.enabled and text:
            print(f"[train] step {done}: {text}", flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(f"[train] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def knn_monitor(cfg: RunConfig, encoder: nn.Module, splits, device, rank: int = 0, world: int = 1) -> float:
    """kNN top-1 of the query encoder on the seeded eval subsets (eval.knn_train_subset / _test_subset),
    in memory or from an image folder. Every rank extracts its share of the images; all get the value."""
    e = cfg.eval
    model = encoder_features(encoder, e.knn_features)
    bank, bank_labels = extract_split(model, cfg, "train", device, splits, e.knn_train_subset, rank, world)
    test, test_labels = extract_split(model, cfg, "test", device, splits, e.knn_test_subset, rank, world)
    classes = NUM_CLASSES.get(cfg.data.dataset) or folder_classes(cfg)
    return dist_mod.broadcast_float(knn_accuracy(bank, bank_labels, test, test_labels, classes, e.knn_k, e.knn_t))


# ---------------------------------------------------------------- the run directory

def prepare_run_dir(cfg: RunConfig, run_dir: Path, is_main: bool) -> None:
    """A new run directory gets config.yaml; an existing one must hold the same run (identity), though
    it may be resumed under other runtime settings (threads, cadences: harness.run.identity.RUNTIME_ONLY)."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        changed = identity_diff(runio.read_config(run_dir), cfg.to_dict())
        if changed:
            raise ConfigError(f"--out {run_dir}: this directory holds a run with a different config "
                              f"({', '.join(changed[:6])}); resuming it would mix two runs. "
                              f"Use another --out directory.")
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runio.write_atomic(saved, dump_yaml(cfg))
    if is_main and runio.read_json(run_dir / "identity.json").get("digest") != cfg.digest():  # new, or an older identity's
        runio.write_json(run_dir / "identity.json", {"digest": cfg.digest(), "identity": cfg.identity()})


def record_attempt(run_dir: Path, cfg: RunConfig, rt: Runtime, attempt: dict | None) -> None:
    """One line per process start in attempts.jsonl: who ran it, where, with which code and settings."""
    runio.append_jsonl(run_dir / "attempts.jsonl", {
        **(attempt or {}), "host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
        "machine": machine_description(), "code": code_origin(),
        "runtime": {**rt.describe(), **{k.split(".", 1)[1]: get_dotted(cfg.to_dict(), k)
                                        for k in RUNTIME_ONLY if k.startswith("runtime.")}},
        "eval": dataclasses.asdict(cfg.eval)})  # the monitor and probe this attempt ran with (not the run's identity)


# ---------------------------------------------------------------- the run

@dataclass
class RunState:
    """Where a run stands. Checkpointed as one unit with the model and the optimizer."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "accuracy": 0.0, "count": 0})

    def to_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "sums": dict(self.sums)}

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunState:
        return cls(state["epoch"], state["step_in_epoch"], state["global_step"], dict(state["sums"]))


class PretrainRun:
    """MoCo pretraining of one run directory: resume, epochs, end-of-epoch work, finish."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rt: Runtime, rank: int, world: int, splits=None):
        """`splits`: in-memory images to train on instead of the dataset's files (the device check's
        synthetic images)."""
        self.cfg, self.run_dir, self.rt, self.rank, self.world = cfg, run_dir, rt, rank, world
        self.is_main = rank == 0
        self.splits = splits or (None if cfg.data.dataset == "imagefolder" else load_tensors(cfg))
        self.views = pretrain_views(cfg, rt.device, rank, world, self.splits)
        self.step = build_step(cfg, rt, bank_size=self.views.size)
        self.model, self.optimizer, self.scaler = self.step.model, self.step.optimizer, self.step.scaler
        self.state = RunState()
        self.resumed = False  # this attempt went on from a checkpoint
        self.last: dict = {}

    def resume(self, required: bool) -> None:
        saved = ckpt.load_latest(self.run_dir / "checkpoints")  # on the CPU; load_state_dict moves tensors
        if required and saved is None:
            raise ConfigError(f"--resume: no usable checkpoint in {self.run_dir / 'checkpoints'}; "
                              f"drop --resume to start afresh.")
        self.resumed = saved is not None
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
            self.state = RunState.from_checkpoint(saved)
            ckpt.set_rng_state(saved["rng"])
        s = self.state
        if self.is_main:
            kept = runio.truncate_metrics(self.run_dir / "metrics.jsonl", s.global_step)
            # The last epoch's figures: a run resumed at its end (to be probed) keeps its final loss and kNN.
            self.last = next((r for r in reversed(kept) if r.get("kind") == "epoch"), {})
            runio.write_status(self.run_dir, RUNNING, epoch=s.epoch, global_step=s.global_step)
            if saved is not None:
                print(f"[train] resumed from {saved['path']} (epoch {s.epoch}, step {s.global_step})", flush=True)
        if self.world > 1:  # wrapped after loading: DDP broadcasts rank 0's weights at construction
            self.step.net = dist_mod.wrap_ddp(self.model, self.rt.device, self.model.dictionary_buffers())

    def save(self, epoch_end: bool = False) -> None:
        """A checkpoint; at the end of an epoch in runtime.keep_epochs, also kept by that epoch's name."""
        if self.is_main:
            saved = ckpt.save(self.run_dir / "checkpoints", {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                **self.state.to_checkpoint(), "rng": ckpt.rng_state(), "config": self.cfg.to_dict(),
            }, keep=self.cfg.runtime.keep_checkpoints)
            if epoch_end and self.state.epoch in self.cfg.runtime.keep_epochs:
                ckpt.keep_epoch(self.run_dir / "checkpoints", saved, self.state.epoch)
        if self.world > 1:
            torch.distributed.barrier()

    def run_epochs(self, on_epoch: EpochCallback | None) -> Outcome:
        progress = Progress(self.is_main, self.cfg.optim.epochs * self.views.steps_per_epoch)
        progress.advance(self.state.global_step, None)
        try:
            while self.state.epoch < self.cfg.optim.epochs:
                tic, start_step = time.perf_counter(), self.state.step_in_epoch
                lr = self.train_epoch(progress)
                if lr is None:
                    return Outcome.DIVERGED
                record = self.end_epoch(time.perf_counter() - tic, start_step, lr, progress)
                # Only rank 0 talks to the pruner; every rank leaves the loop on its word, at the same step.
                if dist_mod.rank0_decides(on_epoch is not None and on_epoch(self.state.epoch, record)):
                    return Outcome.PRUNED
            return Outcome.COMPLETED
        finally:
            progress.close()

    def train_epoch(self, progress: Progress) -> float | None:
        """The rest of the current epoch. Returns the last learning rate, or None if the loss diverged."""
        cfg, s, per_epoch = self.cfg, self.state, self.views.steps_per_epoch
        loss_acc = acc_acc = None
        n_acc, lr = 0, 0.0
        batches = self.views.epoch(s.epoch, s.step_in_epoch, indices=True)
        for step, (x_q, x_k, index) in enumerate(batches, start=s.step_in_epoch):
            lr = learning_rate(cfg, s.epoch, step, per_epoch)
            out = self.step(x_q, x_k, index, lr, s.global_step, self.rank, poison=faults.nan_at(s.global_step + 1))
            s.global_step, s.step_in_epoch = s.global_step + 1, step + 1
            # Accumulate on the device; read back only every log_every steps (no per-step sync).
            loss_acc = out["loss"].detach() if loss_acc is None else loss_acc + out["loss"].detach()
            acc_acc = out["accuracy"] if acc_acc is None else acc_acc + out["accuracy"]
            n_acc += 1
            last_of_epoch = step + 1 == per_epoch
            if s.global_step % cfg.runtime.log_every == 0 or last_of_epoch:
                # Averaged over ranks: what is logged is the global batch's loss, and a NaN on any rank
                # stops every rank at this same step.
                loss_sum, acc_sum = dist_mod.mean_over_ranks(loss_acc.item(), acc_acc.item())
                mean_loss = self._log_steps(loss_sum, acc_sum, n_acc, lr, progress)
                loss_acc = acc_acc = None
                n_acc = 0
                if not math.isfinite(mean_loss):
                    progress.note(f"loss is {mean_loss} at step {s.global_step}: stopping (diverged)")
                    return None
            every = cfg.runtime.checkpoint_every_steps
            if every and s.global_step % every == 0 and not last_of_epoch:
                self.save()
            faults.kill_point(f"after-step-{s.global_step}", self.run_dir)
        return lr

    def _log_steps(self, loss_sum: float, acc_sum: float, n: int, lr: float, progress: Progress) -> float:
        s = self.state
        s.sums["loss"] += loss_sum
        s.sums["accuracy"] += acc_sum
        s.sums["count"] += n
        mean_loss = loss_sum / n
        if self.is_main:
            runio.append_jsonl(self.run_dir / "metrics.jsonl",
                               {"kind": "step", "epoch": s.epoch, "step": s.global_step, "loss": mean_loss, "lr": lr})
        progress.advance(s.global_step, f"epoch {s.epoch + 1} loss {mean_loss:.4f} lr {lr:.4g}")
        return mean_loss

    def end_epoch(self, seconds: float, start_step: int, lr: float, progress: Progress) -> dict:
        """The epoch's record (kNN monitor included), logged; the position advanced; a checkpoint."""
        cfg, s = self.cfg, self.state
        count = max(s.sums["count"], 1)
        record = {"kind": "epoch", "epoch": s.epoch + 1, "step": s.global_step, "loss": s.sums["loss"] / count,
                  "pretext_acc": s.sums["accuracy"] / count, "lr": lr, "epoch_seconds": seconds,
                  "images_per_s": (self.views.steps_per_epoch - start_step) * cfg.optim.batch_size / seconds}
        every, final = cfg.eval.knn_every, s.epoch + 1 == cfg.optim.epochs
        if every and ((s.epoch + 1) % every == 0 or final):  # all ranks: each extracts its share
            record["knn_top1"] = knn_monitor(cfg, self.model.encoder_q, self.splits, self.rt.device,
                                             self.rank, self.world)
        if diagnostics.due(cfg, s.epoch + 1, final):  # reads the run, changes nothing (all ranks)
            record.update(diagnostics.measure(diagnostics.Observed(
                cfg, self.model, self.views, self.rt, s.global_step, self.rank)))
        s.epoch, s.step_in_epoch, s.sums = s.epoch + 1, 0, {"loss": 0.0, "accuracy": 0.0, "count": 0}
        record["time"] = time.time()  # when the epoch's work (training, monitor, diagnostics) ended: wall-clock reports
        self.last = record
        if self.is_main:
            runio.append_jsonl(self.run_dir / "metrics.jsonl", record)
            runio.write_status(self.run_dir, RUNNING, epoch=s.epoch, global_step=s.global_step)
            progress.note(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in record.items() if k != "kind"))
        if s.epoch % cfg.runtime.checkpoint_every == 0 or s.epoch == cfg.optim.epochs or s.epoch in cfg.runtime.keep_epochs:
            self.save(epoch_end=True)
        faults.pace(self.run_dir, resumed=self.resumed)
        faults.hold(s.epoch)
        return record

    def finish(self, outcome: Outcome, probe: bool) -> dict:
        """The final probe (completed runs, once) and status.json. Returns the final status.

        The process group is released first, every rank at the same point: the probe runs on rank 0
        alone (hours for main_lincls on ImageNet), and a rank parked in a barrier meanwhile would be
        aborted by the collective timeout. The other ranks return at once; the job ends with rank 0."""
        s = self.state
        dist_mod.release()
        result = {"status": outcome.value, "epoch": s.epoch, "global_step": s.global_step, "world_size": self.world,
                  "loss": self.last.get("loss"), "knn_top1": self.last.get("knn_top1")}
        if self.is_main:
            if outcome is Outcome.COMPLETED and probe and self.cfg.eval.probe != "none" \
                    and evaluations.find(self.run_dir, probe_settings(self.cfg)) is None:
                runio.write_status(self.run_dir, RUNNING, epoch=s.epoch, global_step=s.global_step, stage="probe")
                faults.stall("probe")
                result["probe"] = probe_run(self.cfg, self.run_dir, self.model.encoder_q, self.splits, self.rt.device)
            runio.write_status(self.run_dir, outcome.value, **{k: v for k, v in result.items() if k != "status"})
        return result


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, on_epoch: EpochCallback | None = None,
          probe: bool = True, attempt: dict | None = None, wait_for_lock: bool = False, splits=None) -> dict:
    """Pretrain one run (resuming from its newest good checkpoint), then probe it.

    Args:
        cfg: the run's configuration (make_config); validated again with the process count.
        run_dir: the run directory; a config.yaml already there must have `cfg`'s identity.
        resume: require a checkpoint to resume from.
        on_epoch: called after each epoch with (epoch, record); True stops the run as PRUNED.
        probe: run the final linear probe (eval.probe) on a completed run.
        attempt: what the caller knows of this attempt (job id, trial), recorded in attempts.jsonl.
        wait_for_lock: a busy run directory is waited for (trial jobs), not an error (the CLI).
        splits: in-memory images to train on instead of the dataset's files (the device check).

    Returns:
        The run's final status.json: status (COMPLETED, PRUNED, DIVERGED), epoch, loss, kNN, probe.

    Raises:
        ConfigError: a config that cannot run with this many processes, a run directory made by
            another config (the differing keys named), `resume` without a checkpoint.
        RunDirBusy: another process holds the run directory (unless `wait_for_lock`).
    """
    run_dir = Path(run_dir)
    rank, world, local_rank = dist_mod.init_from_env(Runtime.device_type(cfg), cfg.runtime.dist_timeout_s)
    validate(cfg, world_size=world)
    rt = Runtime.for_config(cfg, local_rank).apply()
    run_lock = runio.lock_run_dir(run_dir, wait_for_lock) if rank == 0 else None  # held until the run returns
    try:
        prepare_run_dir(cfg, run_dir, rank == 0)
        if rank == 0:
            record_attempt(run_dir, cfg, rt, attempt)
        run = PretrainRun(cfg, run_dir, rt, rank, world, splits)
        run.resume(required=resume)
        return run.finish(run.run_epochs(on_epoch), probe)
    finally:
        if run_lock is not None:
            run_lock.close()
        if dist_mod.is_distributed():  # left by an error: leave the group without waiting for the others
            torch.distributed.destroy_process_group()
