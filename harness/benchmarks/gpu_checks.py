"""The device check's part for the GPU/DDP paths that no CPU run can settle (harness.benchmarks.devicecheck
runs it): each check prints what it measured, at full size on a GPU and at small size elsewhere.

  resume      a run stopped after epoch 1 and resumed on the device (checkpoint loaded to the CPU,
              RNG states restored) ends as the same run uninterrupted: weights, queue, losses;
              "not checked" unless a checkpoint of epoch 1 existed and the second attempt resumed it
  gather      concat_all_gather of a channels_last batch and gather_rows across 2 ranks (NCCL on two
              GPUs, gloo on a CPU; "not checked" on one GPU)
  syncs       host syncs, blocking copies and ops per training step, batches drawn inside the count
              (harness.benchmarks.census; on CUDA also torch.cuda.set_sync_debug_mode)
  layout      channels_last x SplitBatchNorm, cudnn.benchmark on and off: images/s
  decode      data.loader=device_decode's stream order: tensors still read by queued kernels are
              freed, then a batch is decoded; the kernels' sums must come out right (torchvision's
              decoder called directly, beside it, for comparison); "not checked" without CUDA or when
              the queued kernels had already finished when the decode returned
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

from harness.run import process
from harness.run.config import make_config

RECIPE = "cifar10-r18"


def _config(size: dict, *extra: str):
    from harness.benchmarks.sizes import base_overrides

    return make_config(RECIPE, [*base_overrides(size, RECIPE), *extra])


def check_resume(size: dict) -> dict:
    """Two epochs straight, and one epoch, stop, resume, the second: the same final state. Checked
    only if the stop left a checkpoint of epoch 1 and the second attempt resumed from it; otherwise
    the row says "not checked" (a run that starts afresh would match trivially)."""
    import contextlib
    import io

    from harness.data.synthetic import synthetic_splits
    from harness.training import checkpoint as ckpt
    from harness.training.pretrain import train

    steps = size["check_steps"]
    cfg = _config(size, "optim.epochs=2", "eval.knn_every=0", "eval.probe=none", "runtime.log_every=1",
                  "runtime.checkpoint_every=1", f"data.train_subset={steps * 16}")
    splits = synthetic_splits(cfg, steps * cfg.optim.batch_size)
    row = {"part": "gpu", "check": "resume on the device", "recipe": RECIPE}
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the comparison is of state, not of cuDNN's algorithm choice
    try:
        with tempfile.TemporaryDirectory() as tmp:
            straight, resumed = Path(tmp, "straight"), Path(tmp, "resumed")
            train(cfg, straight, probe=False, splits=splits)
            first = train(cfg, resumed, probe=False, splits=splits, on_epoch=lambda epoch, record: epoch == 1)
            stopped_at = ckpt.load_latest(resumed / "checkpoints")
            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                second = train(cfg, resumed, probe=False, splits=splits)
            a, b = ckpt.load_latest(straight / "checkpoints"), ckpt.load_latest(resumed / "checkpoints")
    finally:
        torch.backends.cudnn.deterministic = old
    if first["status"] != "pruned" or stopped_at is None or stopped_at["epoch"] != 1:
        return {**row, "ok": None, "not_checked": "the first attempt left no checkpoint of epoch 1 to resume from"}
    if "resumed from" not in said.getvalue():
        return {**row, "ok": None, "not_checked": "the second attempt did not resume from the checkpoint"}
    diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"]
               if a["model"][k].is_floating_point())
    ok = second["status"] == "completed" and a["global_step"] == b["global_step"]
    return {**row, "state_max_diff": diff, "ok": ok and diff <= 1e-6, "steps": a["global_step"],
            "resumed_at_step": stopped_at["global_step"]}


def _gather_rank(rank: int, world: int, tmp: str, backend: str) -> None:
    import datetime

    import torch.distributed as dist

    from harness.model import distributed

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails, it does not hold the device
    try:
        g = torch.Generator().manual_seed(0)
        shares = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(world)]  # every rank makes all
        x = shares[rank].to(device).contiguous(memory_format=torch.channels_last)
        gathered, expected = distributed.concat_all_gather(x).cpu(), torch.cat(shares)
        counts = [10 - 3 * r for r in range(world)]  # uneven shares: padded for all_gather, then trimmed
        rows = distributed.gather_rows(torch.arange(counts[rank], device=device) + 10 * rank).cpu()
        every = torch.cat([torch.arange(n) + 10 * r for r, n in enumerate(counts)])
        ok = torch.equal(gathered, expected) and torch.equal(rows, every)
        Path(tmp, f"rank{rank}").write_text("ok" if ok else "different")
    finally:
        dist.destroy_process_group()


def check_gather(device: torch.device) -> dict:
    """concat_all_gather of a channels_last batch and gather_rows across 2 ranks: NCCL on 2 GPUs, gloo
    on a CPU; on a single GPU across ranks cannot be checked, and the row says so."""
    import torch.multiprocessing as mp

    row = {"part": "gpu", "check": "gather channels_last"}
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {**row, "backend": "nccl", "ok": None, "not_checked": "one GPU here: a gather across ranks needs two"}
    backend = "nccl" if device.type == "cuda" else "gloo"
    process.torch_forkserver()  # the ranks fork from a torch-preloaded server: not this process, which may hold CUDA
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_gather_rank, args=(2, tmp, backend), nprocs=2, start_method="forkserver")
        ok = all(Path(tmp, f"rank{r}").read_text() == "ok" for r in range(2))
    return {**row, "backend": backend, "world_size": 2, "ok": bool(ok)}


def _steps(cfg, n: int):
    """A training step (harness.training.step) and `n` + 2 of its batches on the device."""
    rt, step, batches = _stream(cfg, n)
    return rt, step, list(batches)


def _stream(cfg, n: int):
    """A training step and an iterator of `n` + 2 of its batches, drawn as training draws them."""
    from harness.data.datasets import pretrain_views
    from harness.data.synthetic import synthetic_splits
    from harness.training.runtime import Runtime
    from harness.training.step import training_step

    rt = Runtime.for_config(cfg).apply()
    splits = synthetic_splits(cfg, cfg.optim.batch_size * (n + 2))
    _, step = training_step(cfg, rt, len(splits.pretrain))
    return rt, step, iter(pretrain_views(cfg, rt.device, splits=splits).epoch(0, indices=True))


def check_syncs(size: dict) -> dict:
    """Host syncs per steady-state step, each step's batch drawn inside the count (the augmentation's
    transfers and read-backs included): the census (any device) and, on CUDA, the driver's own count
    (torch.cuda.set_sync_debug_mode)."""
    from harness.benchmarks.census import StepCensus

    cfg = _config(size, "runtime.log_every=1000")
    n = size["check_steps"]
    rt, step, batches = _stream(cfg, n)
    step(*next(batches))
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    census = StepCensus()
    with warnings.catch_warnings(record=True) as caught, census:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step(*next(batches))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    counted = census.summary()
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"part": "gpu", "check": "syncs per step", "recipe": RECIPE, "steps": n, "device": str(rt.device),
            "syncs_per_step": counted["syncs"] / n, "sync_ops": counted["sync_ops"],
            "blocking_moves_per_step": counted["blocking_moves"] / n, "ops_per_step": counted["ops"] / n,
            "cuda_syncs_per_step": len(syncs) / n if cuda else None, "first": syncs[:3],
            "ok": counted["syncs"] == 0 and counted["blocking_moves"] == 0 and not syncs}


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


def check_decode_order(device: torch.device, trials: int = 20) -> dict:
    """pytorch/vision#9606's case: blocks freed while kernels queued on the step's stream still read
    them are handed to the decoder. Each trial fills tensors the size of a decoded image, queues a
    long kernel and a sum of each behind it, frees them, decodes, then compares the sums."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    from harness.data.folder_views import decode_on_device

    row = {"part": "gpu", "check": "decode stream order"}
    if device.type != "cuda":
        return {**row, "not_checked": "no CUDA device (streams exist only there)"}
    g = torch.Generator().manual_seed(0)
    side, n = 128, 8
    images = [torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(side, side))[0]
              for _ in range(n)]
    jpegs = [encode_jpeg((image * 255).to(torch.uint8)) for image in images]
    boxes = torch.tensor([0, 0, side, side]).repeat(n, 2, 1)
    flips = torch.zeros(n, 2, dtype=torch.bool)
    decoders = {"ours": lambda: decode_on_device(jpegs, boxes, flips, side, device),
                "torchvision directly": lambda: decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)}
    floats = 3 * side * side // 4  # fp32 tensors of a decoded image's bytes: blocks the decoder may be handed
    counts = {}
    for name, decode in decoders.items():
        corrupted = tested = 0
        for _ in range(trials):
            held = [torch.full((floats,), float(i + 1), device=device) for i in range(n)]
            torch.cuda.synchronize(device)
            torch.cuda._sleep(100_000_000)  # a long kernel; the sums queue behind it
            sums = [t.sum() for t in held]
            queued = torch.cuda.Event()
            queued.record()
            del held  # freed while the sums still have to read them
            decode()
            tested += not queued.query()  # the sums had not run yet when the decode returned
            torch.cuda.synchronize(device)
            corrupted += sum(float(total) != (i + 1) * floats for i, total in enumerate(sums))
        counts[name] = {"trials_tested": tested, "corrupted_sums": corrupted}
    if counts["ours"]["trials_tested"] == 0:
        return {**row, **counts, "not_checked": "the queued kernels had finished before a decode returned"}
    return {**row, **counts, "ok": counts["ours"]["corrupted_sums"] == 0}


def run(size: dict) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [check_resume(size), check_gather(device), check_syncs(size), *check_layout(size),
            check_decode_order(device), check_logits(device, 65536 if size["name"] == "full" else 4096)]
    return rows


def describe(r: dict) -> str | None:
    """A row's result in the device check's table (None: not one of these rows)."""
    if r.get("part") != "gpu":
        return None
    if r.get("not_checked"):
        return f"not checked: {r['not_checked']}"
    mark = "" if "ok" not in r else ("ok: " if r["ok"] else "FAILED: ")
    if r["check"].startswith("resume"):
        return (f"{mark}{r['steps']} steps, resumed at step {r['resumed_at_step']}, max weight diff to the "
                f"uninterrupted run {r['state_max_diff']:.3g}")
    if r["check"].startswith("gather"):
        return f"{mark}every rank's share in rank order ({r['backend']}, world size {r['world_size']})"
    if r["check"].startswith("syncs"):
        cuda = "" if r["cuda_syncs_per_step"] is None else f", CUDA's own count {r['cuda_syncs_per_step']:.1f}"
        return (f"{mark}{r['syncs_per_step']:.1f} host syncs and {r['blocking_moves_per_step']:.1f} blocking copies "
                f"per step, {r['ops_per_step']:.0f} ops (census on {r['device']}{cuda})")
    if r["check"].startswith("decode"):
        ours, direct = r["ours"], r["torchvision directly"]
        return (f"{mark}{ours['corrupted_sums']} sums corrupted in {ours['trials_tested']} trials that tested it "
                f"(torchvision's decoder called directly: {direct['corrupted_sums']} in {direct['trials_tested']})")
    if r["check"].startswith("layout"):
        return f"{r['images_per_s']:.0f} images/s (SplitBatchNorm, {r['bn_splits']} splits)"
    with contextlib.suppress(KeyError):
        return (f"{mark}bf16 einsum logits off by up to {r['bf16_einsum_max_diff']:.3g}; the model's fp32 "
                f"similarities under autocast {r['model_max_diff']:.2g} (K {r['queue_size']}, T 0.07; TF32 matmul "
                f"{r['tf32']['matmul']}, cuDNN {r['tf32']['cudnn']})")
    return None
