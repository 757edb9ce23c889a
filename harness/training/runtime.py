"""How a process executes a run: device, precision, memory layout, CPU threads.

One policy for training, probing and benchmarks (each used to decide these its own way). None of it
changes what a run computes beyond float rounding (see harness.run.identity.RUNTIME_ONLY): bf16 is the exception,
which is why `runtime.precision` is part of a run's identity.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  torch.optim imports it at an optimizer's first call; here it comes with the rest of a process's start-up (harness.run.process)
from torch import nn

from harness.run.config import RunConfig
from harness.run.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (fp16 trains with a gradient scaler)
    channels_last: bool
    threads: int  # 0: torch's default

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @staticmethod
    def device_type(cfg: RunConfig) -> str:
        """'cuda' or 'cpu', before a process group exists (the backend depends on it). A run resolved
        to CUDA (config.resolve_execution: its trial was given GPUs) that sees no GPU fails here, at
        once, naming the node: training on the CPU instead would spend the whole time limit."""
        if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(
                f"runtime.device: this run needs a GPU (resources.gpus > 0, or runtime.device=cuda) but node "
                f"{socket.gethostname()} shows none to it (CUDA_VISIBLE_DEVICES={visible!r}, torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}): check the job's GPU request and the "
                f"node's driver, or run on the CPU with runtime.device=cpu.")
        return "cuda" if cfg.runtime.device != "cpu" and torch.cuda.is_available() else "cpu"

    @classmethod
    def for_config(cls, cfg: RunConfig, local_rank: int = 0) -> Runtime:
        r = cfg.runtime
        if cls.device_type(cfg) == "cuda":
            # Sites that bind one GPU per task show each rank a single device: its own, index 0.
            index = local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
        else:
            device = torch.device("cpu")
        cuda = device.type == "cuda"
        precision = r.precision if r.precision != "auto" else ("bf16" if cuda else "fp32")
        if cuda and precision == "bf16" and torch.cuda.get_device_capability(device) < (8, 0):
            raise ConfigError(f"runtime.precision: bf16 on {torch.cuda.get_device_name(device)} (compute capability "
                              f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) is emulated and slow; "
                              f"use runtime.precision=fp16 (with a gradient scaler) or fp32 on GPUs before Ampere.")
        if precision == "fp16" and not cuda:
            raise ConfigError("runtime.precision: fp16 is for CUDA (with a gradient scaler); on a CPU use fp32 or bf16.")
        return cls(device=device, precision=precision,
                   channels_last=r.channels_last == "yes" or (r.channels_last == "auto" and cuda),
                   threads=r.threads)

    def apply(self) -> Runtime:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            # cuDNN picks the fastest convolution algorithm per shape: GPU runs are then not bit-
            # reproducible from run to run (resume stays exact in state: weights, queue, position).
            torch.backends.cudnn.benchmark = True
        return self

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def layout(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.channels_last:
            return images
        return tuple(x.contiguous(memory_format=torch.channels_last) for x in images)

    def autocast(self):
        return _autocast(self.device, DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling (its gradients underflow); bf16 and fp32 do not (a disabled scaler
        is a no-op, so the training step is written once)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def describe(self) -> dict:
        """What an attempt ran with (recorded in attempts.jsonl)."""
        return {"device": str(self.device), "precision": self.precision,
                "channels_last": self.channels_last, "threads": torch.get_num_threads()}


# How frozen-backbone evaluation reads features when asked for (the probe face's --set
# runtime.precision=...); "auto": the rule of inference_dtype.
_INFERENCE_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("inference_precision", default="auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def inference_precision(precision: str):
    """Evaluation inside reads features in `precision` (auto | fp32 | bf16 | fp16)."""
    if precision not in ("auto", *DTYPES):
        raise ConfigError(f"runtime.precision: {precision!r} is not one of auto, fp32, bf16, fp16.")
    token = _INFERENCE_PRECISION.set(precision)
    try:
        yield
    finally:
        _INFERENCE_PRECISION.reset(token)


def inference_dtype(device: torch.device) -> torch.dtype:
    """Frozen-backbone evaluation (kNN, probes) reads features in bf16 on a GPU that has it (Ampere
    and later), fp16 on one that has not (T4, V100: bf16 is refused or emulated there), fp32 on a
    CPU — whatever the run trained in, features are read the same way on the same device — unless
    inference_precision says otherwise (fp16 is refused on a CPU)."""
    asked = _INFERENCE_PRECISION.get()
    if asked != "auto":
        if asked == "fp16" and device.type != "cuda":
            raise ConfigError("runtime.precision: fp16 is for CUDA; on a CPU evaluate in fp32 or bf16.")
        return DTYPES[asked]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def inference_autocast(device: torch.device):
    return _autocast(device, inference_dtype(device))


def _autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype`; float32 means none (autocast is given a dtype it accepts, and disabled)."""
    return torch.autocast(device.type, dtype=dtype if dtype != torch.float32 else torch.bfloat16,
                          enabled=dtype != torch.float32)


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing): a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
