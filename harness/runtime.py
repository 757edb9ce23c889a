"""How a process executes a run: device, precision, memory layout, CPU threads.

One policy for training, probing and benchmarks (each used to decide these its own way). None of it
changes what a run computes beyond float rounding (see config.RUNTIME_ONLY): bf16 is the exception,
which is why `runtime.precision` is part of a run's identity.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    threads: int  # 0: torch's default

    @staticmethod
    def device_type(cfg: RunConfig) -> str:
        """'cuda' or 'cpu', before a process group exists (the backend depends on it)."""
        return "cuda" if cfg.runtime.device != "cpu" and torch.cuda.is_available() else "cpu"

    @classmethod
    def for_config(cls, cfg: RunConfig, local_rank: int = 0) -> "Runtime":
        r = cfg.runtime
        if r.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("runtime.device: 'cuda' was asked for but no GPU is visible; use runtime.device=cpu.")
        if cls.device_type(cfg) == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        cuda = device.type == "cuda"
        return cls(device=device, bf16=r.precision == "bf16" or (r.precision == "auto" and cuda),
                   channels_last=r.channels_last == "yes" or (r.channels_last == "auto" and cuda),
                   threads=r.threads)

    def apply(self) -> "Runtime":
        if self.threads:
            torch.set_num_threads(self.threads)
        return self

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def layout(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.channels_last:
            return images
        return tuple(x.contiguous(memory_format=torch.channels_last) for x in images)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def describe(self) -> dict:
        """What an attempt ran with (recorded in attempts.jsonl)."""
        return {"device": str(self.device), "precision": "bf16" if self.bf16 else "fp32",
                "channels_last": self.channels_last, "threads": torch.get_num_threads()}


def inference_autocast(device: torch.device):
    """Frozen-backbone evaluation (kNN, probes): bf16 on CUDA, fp32 on CPU — whatever the run trained
    in, features are read the same way on the same device."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def machine_description() -> str:
    """CPU model and cores, GPUs, torch version: what a report says the numbers came from."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    gpu_text = f", {len(gpus)} x {gpus[0]}" if gpus else ", no GPU"
    return f"{cpu} ({cores} cores available to the job){gpu_text}, torch {torch.__version__}"
