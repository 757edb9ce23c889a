"""Process-group helpers: start-up from torchrun-style or submitit environments, gathers, and the
few collective decisions that keep every rank in step.

A DDP run stays correct only while every rank issues the same collectives in the same order. So a
run's stop decisions (pruned, diverged) are taken once and shared (`rank0_decides`, the loss is
averaged over ranks before its NaN check), and the end of training releases the group (`release`)
before rank 0's final probe, instead of parking the other ranks in a barrier for the probe's hours.
The group's timeout (`runtime.dist_timeout_s`) turns any remaining mismatch into an error within
that time instead of a job that holds its GPUs until the wall-clock limit.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device_type: str, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (torchrun, or
    submitit's TorchDistributedEnvironment().export()). Returns (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not is_distributed():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def wrap_ddp(model: torch.nn.Module, device: torch.device, not_broadcast: list[str]) -> torch.nn.Module:
    """DistributedDataParallel over `model`. `not_broadcast`: buffers every rank keeps equal by itself
    (MoCo's queue and bank are filled with gathered keys everywhere); DDP would otherwise send rank
    0's copy before every forward (an ImageNet memory bank is 655 MB)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, not_broadcast)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def release() -> None:
    """Leave the process group, all ranks at the same point: after it no rank waits for another."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where this rank's collectives put their tensors (NCCL needs them on the rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank0_decides(decision: bool) -> bool:
    """Rank 0's `decision` on every rank (only rank 0 talks to the pruner)."""
    if not is_distributed():
        return decision
    flag = torch.tensor([1 if decision else 0], device=_device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def mean_over_ranks(*values: float) -> tuple[float, ...]:
    """The mean of each value over all ranks (a NaN on any rank makes the mean NaN on every rank)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return tuple((t / world_size()).tolist())


def broadcast_float(value: float | None) -> float | None:
    """Rank 0's value (None included) on every rank."""
    if not is_distributed():
        return value
    t = torch.tensor([float("nan") if value is None else value, 0.0 if value is None else 1.0],
                     dtype=torch.float64, device=_device())
    dist.broadcast(t, src=0)
    return float(t[0]) if t[1] else None


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order (no gradient). Input and output buffers are both
    contiguous: a channels_last input would otherwise meet buffers of another layout."""
    if not is_distributed():
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def concat_all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """As concat_all_gather, but gradients flow back to each rank's own slice (end-to-end keys)."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order; ranks may hold different numbers of rows
    (padded to the longest for all_gather, then trimmed)."""
    if not is_distributed():
        return x
    sizes = concat_all_gather(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = concat_all_gather(padded).view(len(sizes), max(sizes), *x.shape[1:])
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def chunk_of(n_total: int, rank_: int, world: int) -> slice:
    """This rank's rows of `n_total`: chunks of ceil(n / world) rows, in rank order."""
    per = -(-n_total // world)
    return slice(min(rank_ * per, n_total), min((rank_ + 1) * per, n_total))
