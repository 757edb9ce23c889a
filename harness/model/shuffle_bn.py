"""Shuffle BN: encode keys in a shuffled batch order so BatchNorm statistics cannot leak which
key belongs to which query (He et al. 2019, Sec. 3.3).

`ddp`: gather the key images of all ranks, permute with rank 0's permutation, each rank encodes
its slice, then gather and un-permute. `split`: permute on one device; SplitBatchNorm supplies
the "several GPUs". `none`: no shuffle (the ablation the paper warns about).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from harness.model.distributed import concat_all_gather, concat_all_gather_with_grad, is_distributed, rank, world_size


def shuffle_single(x: torch.Tensor):
    perm = torch.randperm(x.shape[0], device=x.device)
    return x[perm], torch.argsort(perm)


def unshuffle_single(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]


def shuffle_ddp(x: torch.Tensor, differentiable: bool = False):
    """Returns this rank's slice of the globally permuted batch and the index that undoes it."""
    gather = concat_all_gather_with_grad if differentiable else concat_all_gather
    x_all = gather(x)
    n_local, n_all = x.shape[0], x_all.shape[0]
    perm = torch.randperm(n_all, device=x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)  # every rank uses rank 0's permutation
    idx_unshuffle = torch.argsort(perm)
    mine = perm.view(world_size(), n_local)[rank()]
    return x_all[mine], idx_unshuffle


def unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    gather = concat_all_gather_with_grad if differentiable else concat_all_gather
    x_all = gather(x)
    n_local = x.shape[0]
    mine = idx_unshuffle.view(world_size(), n_local)[rank()]
    return x_all[mine]


def encode_shuffled(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str,
                    differentiable: bool = False) -> torch.Tensor:
    """encode(x) with the batch order hidden from BatchNorm, outputs in the original order."""
    if mode == "none":
        return encode(x)
    if mode == "split":
        shuffled, undo = shuffle_single(x)
        return unshuffle_single(encode(shuffled), undo)
    shuffled, undo = shuffle_ddp(x, differentiable)
    return unshuffle_ddp(encode(shuffled), undo, differentiable)
