"""Dictionary diagnostics: what the paper argues, measured in the run (He et al. 2019, Sec. 3.2).

MoCo's claim is that a contrastive dictionary must be large *and consistent*: the keys in the queue
should come from a key encoder that has barely changed since they were made. Every view of this
harness is reproducible from its seed, so consistency can be measured exactly: the keys a queue slot
holds are compared with the keys the *current* key encoder gives the very same views now.

  key consistency   for queue blocks of a few ages (newest, 1/4, 1/2, oldest, in steps), the mean
                    cosine between the stored keys and fresh keys of the same views, encoded as the
                    key encoder encodes keys (train-mode BatchNorm, Shuffle BN with the step's own
                    permutation). Memory bank: the stored entry against the query encoder's feature of
                    the view that last updated it, by the age of that update. End-to-end: 1 by
                    construction (keys are made with the encoder in use), not computed.
  alignment,        Wang & Isola 2020 on a fixed subset: E||f(x) - f(x')||^2 over two views, and
  uniformity        log E exp(-2 ||f(x) - f(y)||^2) over pairs of images (normalised embeddings).
  effective rank    exp(entropy) of the normalised singular values of the backbone features
                    (Roy & Vetterli 2007; RankMe): collapse shows as a falling rank. At most the
                    subset's size (eval.diagnostics_subset): keep it above the feature width.

None of it changes what the run computes: every random draw is made under a forked generator state,
every buffer the forward passes touch (BatchNorm statistics) is restored, parameters are only read,
and the cadence is not part of the run's identity (tested bit-identical with and without).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.model import distributed as dist_mod
from harness.model.moco import MoCo
from harness.run.config import RunConfig
from harness.training.runtime import Runtime
from harness.training.step import step_seed


@dataclass
class Observed:
    """What the diagnostics read of a run, and all they read: its config, model, two-view source
    (`batch_at`, `pairs`, `steps_per_epoch`), runtime, and the steps taken so far. Never written."""
    cfg: RunConfig
    model: MoCo
    views: Any
    rt: Runtime
    global_step: int
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def untouched(*modules: nn.Module):
    """Forward passes inside leave the modules' buffers and modes and the global RNG as they were."""
    saved = [{k: v.clone() for k, v in m.named_buffers()} for m in modules]
    modes = [[sub.training for sub in m.modules()] for m in modules]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for m, buffers, mode in zip(modules, saved, modes):
            for name, value in m.named_buffers():
                value.copy_(buffers[name])
            for sub, training in zip(m.modules(), mode):
                sub.training = training


def sampled_ages(oldest: int) -> list[int]:
    """Newest, 1/4, 1/2 and oldest age (steps), distinct."""
    return sorted({1, max(1, oldest // 4), max(1, oldest // 2), max(1, oldest)})


def _fresh_keys(run: Observed, step: int) -> torch.Tensor:
    """Keys of step `step`'s views by the current key encoder, laid out as the queue stored them
    (every rank's keys gathered in rank order; the symmetric loss's second keys after the first)."""
    model = run.model
    per_epoch = run.views.steps_per_epoch
    x_q, x_k, _ = run.views.batch_at(step // per_epoch, step % per_epoch)
    x_q, x_k = run.rt.layout(x_q, x_k)
    torch.manual_seed(step_seed(run.cfg, step, run.rank))  # the step's own Shuffle BN permutation
    with run.rt.autocast():
        keys = [model.encode_keys(x_k)]
        if model.symmetric:
            keys.append(model.encode_keys(x_q))
    return dist_mod.concat_all_gather(torch.cat(keys))


def queue_consistency(run: Observed) -> list[tuple[int, float]]:
    """(age in steps, mean cosine stored vs fresh) for the queue (momentum or shared key encoder)."""
    model, step = run.model, run.global_step
    per_step = run.cfg.optim.batch_size * (2 if model.symmetric else 1)
    oldest = min(model.K // per_step, step)  # blocks written so far and not overwritten
    result = []
    for age in sampled_ages(oldest) if oldest else []:
        if age == 1 and model.mechanism.momentum_encoder:
            # The newest block was encoded by theta_k as it is now (the momentum update comes first in
            # a step, and no step has run since): 1 by construction, not computed.
            result.append((1, 1.0))
            continue
        made = step - age  # the step (0-based) whose keys fill this block
        lo = (made * per_step) % model.K
        stored = model.queue[:, lo:lo + per_step].T.float()
        fresh = _fresh_keys(run, made)
        result.append((age, float((stored * fresh).sum(dim=1).mean())))
    return result


def bank_consistency(run: Observed) -> list[tuple[int, float]]:
    """(age in steps of the entry's last update, mean cosine of entry vs the query encoder's feature
    of the view that updated it), over the epoch just ended (each image updates once an epoch)."""
    model, step, per_epoch = run.model, run.global_step, run.views.steps_per_epoch
    result = []
    for age in sampled_ages(min(per_epoch, step)):
        made = step - age
        x_q, _, index = run.views.batch_at(made // per_epoch, made % per_epoch)
        (x_q,) = run.rt.layout(x_q)
        torch.manual_seed(step_seed(run.cfg, made, run.rank))
        with run.rt.autocast():
            fresh = F.normalize(model.encoder_q(x_q).float(), dim=1)
        cosine = float((model.bank[index].float() * fresh).sum(dim=1).mean())
        result.append((age, dist_mod.mean_over_ranks(cosine)[0]))
    return result


def alignment_uniformity_rank(run: Observed) -> dict[str, float]:
    """Wang & Isola's alignment and uniformity of q = normalize(f_q(x)), and the backbone features'
    effective rank, on a fixed subset (eval mode: BatchNorm reads its statistics, updates none)."""
    encoder = run.model.encoder_q
    v1, v2 = run.views.pairs(run.cfg.eval.diagnostics_subset)
    (both,) = run.rt.layout(torch.cat([v1, v2]))
    encoder.eval()
    with run.rt.autocast():  # one pass over both views (eval mode: no batch dependence)
        h = encoder.backbone(both).float()
        z1, z2 = F.normalize(encoder.head(h).float(), dim=1).chunk(2)
    h1 = h[:len(v1)]
    alignment = float((z1 - z2).pow(2).sum(dim=1).mean())
    uniformity = float(torch.pdist(z1).pow(2).mul(-2).exp().mean().log())
    s = torch.linalg.svdvals(h1.double())
    p = s / s.sum()
    effective_rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
    return {"alignment": alignment, "uniformity": uniformity, "effective_rank": effective_rank}


def due(cfg, epoch: int, final: bool) -> bool:
    """Whether the epoch just ended (1-based `epoch`) gets diagnostics."""
    every = cfg.eval.knn_every if cfg.eval.diagnostics_every is None else cfg.eval.diagnostics_every
    return bool(every) and (epoch % every == 0 or final)


def measure(run: Observed) -> dict:
    """The epoch record's diagnostics (all ranks call it: fresh keys are gathered across ranks)."""
    model = run.model
    record: dict = {}
    tic = time.perf_counter()
    with untouched(model):
        if model.mechanism.consistent_by_construction:  # keys made by the encoder in use
            ages = []
        elif model.mechanism.negatives == "bank":
            ages = bank_consistency(run)
        else:
            ages = queue_consistency(run)
        if ages:
            record["key_consistency"] = ages[-1][1]  # at the oldest sampled age
            record["key_consistency_ages"] = [[age, value] for age, value in ages]
        if run.is_main:
            record.update(alignment_uniformity_rank(run))
    record["diagnostics_seconds"] = time.perf_counter() - tic  # its cost, beside the epoch's epoch_seconds
    return {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
