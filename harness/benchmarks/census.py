"""What one training step asks of the device, counted on any device (a CPU included): its aten ops,
its host synchronisations and its host-to-device copies.

On a GPU each of these costs time the device cannot hide: a host sync (`.item()`, `int(t)`, or an op
whose output shape depends on data: `nonzero`, boolean indexing, `masked_select`, `unique`) stops the
host until every queued kernel has run; a copy from pageable host memory, or one without
`non_blocking`, does the same; every op is a kernel launch of a few microseconds of host time. They
are the same calls on a CPU, so a CPU run counts them exactly; what the GPU would spend on them is not
measured here (the device check does that where a GPU is lent).

    census = StepCensus()
    with census:
        ...one step, its batch drawn inside...
    census.summary()  # {"ops": ..., "syncs": ..., "moves": ..., "blocking_moves": ..., "sync_ops": {...}}
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a value back to the host, or whose output size depends on the data (so the host
# must wait for it to allocate the output).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "repeat_interleave.Tensor", "is_nonzero"}


def _is_bool_index(func, args) -> bool:
    """x[mask] with a boolean mask: aten.index.Tensor whose index list holds a bool tensor."""
    if func.__name__ not in ("index.Tensor", "index_put.default", "index_put_.default"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class StepCensus(TorchDispatchMode):
    """Counts, while active: every aten op (below autograd: forward, backward and optimizer alike),
    the host syncs among them, and calls of `Tensor.to` / `Tensor.cuda` that name a device (the
    step's moves to the device; `blocking` when not `non_blocking=True`)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self.moves = 0
        self.blocking_moves = 0
        self._to = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        base = name.split(".")[0]
        self.ops[name] += 1
        if base in SYNC_OPS or name in SYNC_OPS or _is_bool_index(func, args):
            self.sync_ops[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        census, to = self, torch.Tensor.to

        def counted_to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (torch.device, str)) and not _is_dtype_name(target):
                census.moves += 1
                census.blocking_moves += not kwargs.get("non_blocking", len(args) > 2 and args[2])
            return to(tensor, *args, **kwargs)

        self._to, torch.Tensor.to = to, counted_to
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.to = self._to
        return super().__exit__(*exc)

    def summary(self) -> dict:
        return {"ops": sum(self.ops.values()), "syncs": sum(self.sync_ops.values()), "moves": self.moves,
                "blocking_moves": self.blocking_moves, "sync_ops": dict(self.sync_ops)}


def _is_dtype_name(target) -> bool:
    return isinstance(target, str) and not any(target.startswith(d) for d in ("cpu", "cuda", "meta", "mps", "xpu"))


def step_census(cfg, steps_before: int = 2, splits=None) -> dict:
    """The census of one steady-state training step of `cfg` (a step that does not log), its batch
    drawn from the run's own view source inside the count, after `steps_before` steps."""
    from harness.data.datasets import pretrain_views
    from harness.data.synthetic import synthetic_splits
    from harness.training.runtime import Runtime
    from harness.training.step import training_step

    rt = Runtime.for_config(cfg).apply()
    if splits is None and cfg.data.dataset != "imagefolder":
        splits = synthetic_splits(cfg, cfg.optim.batch_size * (steps_before + 2))
    views = pretrain_views(cfg, rt.device, splits=splits)
    _, step = training_step(cfg, rt, views.size)
    batches = iter(views.epoch(0, indices=True))
    for _ in range(steps_before):
        step(*next(batches))
    census = StepCensus()
    with census:
        step(*next(batches))
    return {**census.summary(), "batch": cfg.optim.batch_size, "recipe": cfg.recipe}

