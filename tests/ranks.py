"""Gloo ranks for the tests that run DDP code in several processes.

`torch.multiprocessing.spawn` starts each rank as a fresh interpreter, and a rank that imports torch,
torchvision and `torch._dynamo` (which torchvision's ops and every `torch.optim` optimizer pull in)
spends ~5 s of CPU before its first collective: two ranks a test, a dozen tests. The ranks here are
forked from a forkserver that imported those once per pytest worker. Each rank is still a process of
its own with its own torch state (the server only imported modules: no op ran, no thread started, no
seed was drawn), so what a rank computes is what a spawned one computes."""
from __future__ import annotations

import multiprocessing

import torch.multiprocessing as mp

PRELOAD = ["torch", "torchvision", "torch.distributed", "harness.training.pretrain", "harness.model.moco"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)  # before the server starts: on the first run_ranks of this worker


def run_ranks(fn, args: tuple, nprocs: int) -> None:
    """fn(rank, *args) in `nprocs` processes; raises as `mp.spawn` does when a rank fails."""
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
