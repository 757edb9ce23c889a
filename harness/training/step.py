"""The training step: one place for the optimizer a run builds and the SGD step it takes, used by a
run (harness.training.pretrain), the benchmarks, the estimate and the device check alike."""
from __future__ import annotations

import math

import torch
from torch import nn

from harness.data.spec import seeded_generator
from harness.model.moco import build_moco, compile_encoders
from harness.run.config import RunConfig
from harness.training.runtime import Runtime


def learning_rate(cfg: RunConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Linear warm-up per step, then cosine or step decay per epoch (as the official code)."""
    o, base = cfg.optim, cfg.scaled_lr()
    if epoch < o.warmup_epochs:
        return base * (epoch * steps_per_epoch + step_in_epoch + 1) / (o.warmup_epochs * steps_per_epoch)
    if o.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / o.epochs))
    return base * 0.1 ** sum(epoch >= m for m in o.milestones)


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.SGD:
    """SGD on the query encoder only (the key encoder moves by the momentum update, never by a
    gradient), at the batch-scaled learning rate; the schedule sets each step's rate. On CUDA the
    fused kernel (one launch for the whole update); on the CPU the foreach one, whose rounding every
    CPU run has had (the fused kernel's multiply-adds differ in the last bit)."""
    params = list(model.encoder_q.parameters())
    fused = params[0].device.type == "cuda"
    return torch.optim.SGD(params, lr=cfg.scaled_lr(), momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay, foreach=not fused, fused=fused)


def step_seed(cfg: RunConfig, global_step: int, rank: int) -> int:
    """The seed of training step `global_step` on `rank`: all randomness inside a step (Shuffle BN's
    permutations) derives from it, so the dictionary diagnostics can re-make a step's keys exactly."""
    return seeded_generator("step", cfg.runtime.seed, global_step, rank).initial_seed()


class MocoStep:
    """One SGD step of MoCo on a batch of views: forward (autocast, memory layout), loss scaling,
    backward, optimizer. Nothing here reads a value back from the device."""

    def __init__(self, cfg: RunConfig, rt: Runtime, model: nn.Module):
        self.cfg, self.rt, self.model = cfg, rt, model
        self.net: nn.Module = model  # DistributedDataParallel(model) once wrapped
        self.optimizer = make_optimizer(cfg, model)
        self.scaler = rt.grad_scaler()  # fp16 only; a no-op otherwise

    def __call__(self, x_q: torch.Tensor, x_k: torch.Tensor, index: torch.Tensor, lr: float,
                 global_step: int, rank: int = 0, poison: bool = False) -> dict:
        """The step number `global_step` (0-based) at learning rate `lr`. Returns the model's output
        (loss, accuracy: device tensors). `poison`: the loss made NaN (fault injection)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_q, x_k = self.rt.layout(x_q, x_k)
        torch.manual_seed(step_seed(self.cfg, global_step, rank))
        with self.rt.autocast():
            out = self.net(x_q, x_k, index)
        if poison:
            out["loss"] = out["loss"] * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out


def build_step(cfg: RunConfig, rt: Runtime, bank_size: int, compile_backend: str = "inductor") -> MocoStep:
    """The run's model from seed `runtime.seed` (identical initial weights on every rank and every
    level), prepared for the device and compiled if asked, and its step."""
    torch.manual_seed(cfg.runtime.seed)
    model = rt.prepare(build_moco(cfg, bank_size=bank_size))
    if cfg.runtime.compile:
        compile_encoders(model, compile_backend)
    return MocoStep(cfg, rt, model)


def training_step(cfg: RunConfig, rt: Runtime, bank_size: int, compile_backend: str = "inductor"):
    """The run's model and a function `step(x_q, x_k, index)` taking the run's steps one after
    another from step 0 at the schedule's rates; returns the loss tensor without syncing. For the
    throughput benchmark, the estimate and the device check. `bank_size`: the training images."""
    moco = build_step(cfg, rt, bank_size, compile_backend)
    per_epoch = max(1, bank_size // cfg.optim.batch_size)
    taken = 0

    def step(x_q, x_k, index):
        nonlocal taken
        epoch, in_epoch = divmod(taken, per_epoch)
        out = moco(x_q, x_k, index, learning_rate(cfg, epoch, in_epoch, per_epoch), taken)
        taken += 1
        return out["loss"]

    return moco.model, step


def median_step_seconds(cfg, threads: int, steps: int, warmup: int) -> float:
    """Median seconds of one training step (its batch's augmentation included) with `threads` CPU
    threads, on synthetic images of the recipe's shape (harness.planning.estimate caches it)."""
    import statistics
    import time

    from harness.data.datasets import pretrain_views
    from harness.data.synthetic import synthetic_splits

    torch.set_num_threads(threads)
    rt = Runtime.for_config(cfg)
    splits = synthetic_splits(cfg, cfg.optim.batch_size * (steps + warmup))
    _, step = training_step(cfg, rt, len(splits.pretrain))
    batches = iter(pretrain_views(cfg, rt.device, splits=splits).epoch(0, indices=True))
    timings = []
    for i in range(steps + warmup):
        tic = time.perf_counter()
        step(*next(batches)).item()  # the batch's augmentation is part of a step's cost
        if i >= warmup:
            timings.append(time.perf_counter() - tic)
    return statistics.median(timings)
