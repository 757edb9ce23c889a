"""The device check's part for the GPU/DDP paths that no CPU run can settle (harness.benchmarks.devicecheck
runs it): each check prints what it measured, at full size on a GPU and at small size elsewhere.

  resume      a run stopped after epoch 1 and resumed on the device (checkpoint loaded to the CPU,
              RNG states restored) ends as the same run uninterrupted: weights, queue, losses
  gather      concat_all_gather of a channels_last batch and gather_rows under the device's
              backend (NCCL on a GPU), world size 1: equal to the input
  syncs       host-device synchronisations per training step (torch.cuda.set_sync_debug_mode)
  layout      channels_last x SplitBatchNorm, cudnn.benchmark on and off: images/s
  logits      InfoNCE logits at T = 0.07 against a queue of K keys: bf16 einsum vs fp32, and the
              model's own path under autocast (fp32 similarities) vs fp32; TF32 settings noted
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from harness.run.config import make_config

RECIPE = "cifar10-r18"


def _config(size: dict, *extra: str):
    from harness.benchmarks.sizes import base_overrides

    return make_config(RECIPE, [*base_overrides(size, RECIPE), *extra])


def check_resume(size: dict) -> dict:
    """Two epochs straight, and one epoch, stop, resume, the second: the same final state."""
    from harness.data.synthetic import synthetic_splits
    from harness.training import checkpoint as ckpt
    from harness.training.pretrain import train

    steps = size["check_steps"]
    cfg = _config(size, "optim.epochs=2", "eval.knn_every=0", "eval.probe=none", "runtime.log_every=1",
                  f"data.train_subset={steps * 16}")
    splits = synthetic_splits(cfg, steps * cfg.optim.batch_size)
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the comparison is of state, not of cuDNN's algorithm choice
    try:
        with tempfile.TemporaryDirectory() as tmp:
            straight, resumed = Path(tmp, "straight"), Path(tmp, "resumed")
            train(cfg, straight, probe=False, splits=splits)
            first = train(cfg, resumed, probe=False, splits=splits, on_epoch=lambda epoch, record: epoch == 1)
            second = train(cfg, resumed, probe=False, splits=splits)
            a, b = ckpt.load_latest(straight / "checkpoints"), ckpt.load_latest(resumed / "checkpoints")
    finally:
        torch.backends.cudnn.deterministic = old
    diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"]
               if a["model"][k].is_floating_point())
    ok = first["status"] == "pruned" and second["status"] == "completed" and a["global_step"] == b["global_step"]
    return {"part": "gpu", "check": "resume on the device", "recipe": RECIPE, "state_max_diff": diff,
            "ok": ok and diff <= 1e-6, "steps": a["global_step"]}


def check_gather(device: torch.device) -> dict:
    import torch.distributed as dist

    from harness.model import distributed

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            x = torch.randn(16, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            gathered = distributed.concat_all_gather(x)
            rows = distributed.gather_rows(torch.arange(10, device=device))
            ok = torch.equal(gathered, x) and torch.equal(rows, torch.arange(10, device=device))
        finally:
            dist.destroy_process_group()
    return {"part": "gpu", "check": "gather channels_last", "backend": backend, "ok": bool(ok)}


def _steps(cfg, n: int):
    """A training step (harness.training.step) and `n` + 2 of its batches on the device."""
    from harness.data.datasets import pretrain_views
    from harness.data.synthetic import synthetic_splits
    from harness.training.runtime import Runtime
    from harness.training.step import training_step

    rt = Runtime.for_config(cfg).apply()
    splits = synthetic_splits(cfg, cfg.optim.batch_size * (n + 2))
    _, step = training_step(cfg, rt, splits)
    return rt, step, list(pretrain_views(cfg, rt.device, splits=splits).epoch(0, indices=True))


def check_syncs(size: dict) -> dict:
    cfg = _config(size)
    if not torch.cuda.is_available():
        return {"part": "gpu", "check": "syncs per step", "recipe": RECIPE, "syncs_per_step": None,
                "note": "no CUDA here: host-device syncs exist on a GPU only"}
    n = size["check_steps"]
    _, step, batches = _steps(cfg, n)
    step(*batches[0])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches[1:n + 1]:
                step(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"part": "gpu", "check": "syncs per step", "recipe": RECIPE, "syncs_per_step": len(syncs) / n,
            "first": syncs[:3]}


def check_layout(size: dict) -> list[dict]:
    from harness.training.runtime import synchronize

    rows = []
    for channels_last in ("no", "yes"):
        for benchmark in (False, True):
            cfg = _config(size, f"runtime.channels_last={channels_last}")
            rt, step, batches = _steps(cfg, size["steps"])
            torch.backends.cudnn.benchmark = benchmark  # after Runtime.apply, which turns it on for CUDA
            step(*batches[0])
            timings = []
            for batch in batches[1:size["steps"] + 1]:
                synchronize(rt.device)
                tic = time.perf_counter()
                step(*batch)
                synchronize(rt.device)
                timings.append(time.perf_counter() - tic)
            rows.append({"part": "gpu", "check": f"layout channels_last={channels_last} cudnn.benchmark={benchmark}",
                         "recipe": RECIPE, "bn_splits": cfg.moco.bn_splits,
                         "images_per_s": cfg.optim.batch_size / statistics.median(timings)})
    torch.backends.cudnn.benchmark = torch.cuda.is_available()
    return rows


def check_logits(device: torch.device, queue_size: int) -> dict:
    from harness.model.moco import MoCo

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=1).to(device)
    k = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=1).to(device)
    model = MoCo(lambda: torch.nn.Identity(), dim=128, queue_size=queue_size, temperature=0.07).to(device)
    reference_loss, reference = model._infonce(q, k)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        bf16 = torch.einsum("nc,ck->nk", q, model.queue) / 0.07  # what the similarities were before
        loss, logits = model._infonce(q, k)
    return {"part": "gpu", "check": "logits bf16 vs fp32", "queue_size": queue_size, "temperature": 0.07,
            "bf16_einsum_max_diff": float((bf16.float() - reference[:, 1:]).abs().max()),
            "model_max_diff": float((logits - reference).abs().max()),
            "model_loss_diff": float((loss - reference_loss).abs()),
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "ok": float((logits - reference).abs().max()) <= 1e-3}


def run(size: dict) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [check_resume(size), check_gather(device), check_syncs(size), *check_layout(size),
            check_logits(device, 65536 if size["name"] == "full" else 4096)]
    return rows


def describe(r: dict) -> str | None:
    """A row's result in the device check's table (None: not one of these rows)."""
    if r.get("part") != "gpu":
        return None
    mark = "" if "ok" not in r else ("ok: " if r["ok"] else "FAILED: ")
    if r["check"].startswith("resume"):
        return f"{mark}{r['steps']} steps, max weight diff to the uninterrupted run {r['state_max_diff']:.3g}"
    if r["check"].startswith("gather"):
        return f"{mark}equal to the input ({r['backend']}, world size 1)"
    if r["check"].startswith("syncs"):
        return r.get("note") or f"{r['syncs_per_step']:.1f} host-device syncs per step"
    if r["check"].startswith("layout"):
        return f"{r['images_per_s']:.0f} images/s (SplitBatchNorm, {r['bn_splits']} splits)"
    with contextlib.suppress(KeyError):
        return (f"{mark}bf16 einsum logits off by up to {r['bf16_einsum_max_diff']:.3g}; the model's fp32 "
                f"similarities under autocast {r['model_max_diff']:.2g} (K {r['queue_size']}, T 0.07; TF32 matmul "
                f"{r['tf32']['matmul']}, cuDNN {r['tf32']['cudnn']})")
    return None
