"""The training step as the benchmarks, the estimate and the device check take it: the same model,
optimizer, autocast and memory layout as a run (harness.training.pretrain), without a run directory."""
from __future__ import annotations

import torch

from harness.model.moco import build_moco, compile_encoders
from harness.training.runtime import Runtime


def training_step(cfg, rt: Runtime, splits, compile_backend: str = "inductor"):
    """A MoCo model from seed `runtime.seed` and its SGD step as training takes it (autocast, memory
    layout): `step(x_q, x_k, index)` returns the loss tensor without syncing. For the throughput
    benchmark and the device check's comparisons of fast paths."""
    torch.manual_seed(cfg.runtime.seed)
    model = rt.prepare(build_moco(cfg, bank_size=len(splits.pretrain)))
    if cfg.runtime.compile:
        compile_encoders(model, compile_backend)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.optim.lr, momentum=0.9,
                          weight_decay=cfg.optim.weight_decay, foreach=True)

    def step(x_q, x_k, index):
        with rt.autocast():
            out = model(*rt.layout(x_q, x_k), index)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out["loss"]

    return model, step


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
    _, step = training_step(cfg, rt, splits)
    batches = iter(pretrain_views(cfg, rt.device, splits=splits).epoch(0, indices=True))
    timings = []
    for i in range(steps + warmup):
        tic = time.perf_counter()
        step(*next(batches)).item()  # the batch's augmentation is part of a step's cost
        if i >= warmup:
            timings.append(time.perf_counter() - tic)
    return statistics.median(timings)
