"""`python -m harness.bench [train] [data] [probe] [overhead]`: throughput, measured, not guessed.

  train     MoCo steps/s and images/s after warm-up, batched (on-device) vs per-image (PIL +
            DataLoader) data path, median of repeats, synchronised timing; FLOP/s of the step
  data      augmented image pairs/s: batched vs per-image; on an image-folder recipe (data.root, or
            --synthetic-jpeg N) the loader's images/s per core, old and new path side by side
  probe     fast vs standard linear probe on a trained run (--run DIR): seconds and top-1
  monitor   the kNN monitor's cost against a training epoch and its estimate against its bank size
            (--run DIR,DIR...: finished runs of one recipe; harness/benchmarks/monitor.py)
  walltime  a trial's pretraining wall time against its training seconds, the probe's apart, from the
            run directories' own files (--run DIR,DIR... or STUDY/runs)
  overhead  submit -> trial-start latency per executor (debug, local, slurm when present)
  device    the prepared check for a lent GPU (harness/benchmarks/devicecheck.py): fast paths vs fp32 eager,
            throughput of the GPU recipes, peak memory, several trials on one device

Prints a table and writes JSON to results/bench/.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from harness.benchmarks.census import StepCensus
from harness.benchmarks.monitor import bench_monitor
from harness.benchmarks.options import BenchOptions
from harness.benchmarks.walltime import bench_walltime
from harness.data.datasets import load_tensors, pretrain_views
from harness.data.synthetic import synthetic_splits
from harness.run.config import EVAL_ONLY, PROBE_PROTOCOLS, RunConfig, make_config, with_overrides
from harness.training.runtime import Runtime, synchronize
from harness.training.step import training_step

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor figures




def _setup(args: BenchOptions, loader: str):
    cfg = make_config(args.recipe, [*args.overrides, f"data.loader={loader}"])
    rt = Runtime.for_config(cfg).apply()
    splits = synthetic_splits(cfg, args.synthetic) if args.synthetic else load_tensors(cfg)
    return cfg, rt, splits


def _median_rate(timings: list[float], units: float) -> float:
    return units / statistics.median(timings)


def bench_data(args: BenchOptions) -> list[dict]:
    cfg = make_config(args.recipe, args.overrides)
    if cfg.data.dataset == "imagefolder" and not args.synthetic:  # files: the folder pipeline's bench
        from harness.benchmarks.folders import bench_folder_data

        return bench_folder_data(args, args.overrides)
    rows = []
    for loader in ("batched", "per_image"):
        cfg, rt, splits = _setup(args, loader)
        device = rt.device
        views = pretrain_views(cfg, device, splits=splits)
        it = iter(views.epoch(0))
        for _ in range(args.warmup):
            next(it)
        timings = []
        for _ in range(args.repeats):
            synchronize(device)
            tic = time.perf_counter()
            for _ in range(args.steps):
                x_q, x_k = next(it)
            synchronize(device)
            timings.append(time.perf_counter() - tic)
        pairs = _median_rate(timings, args.steps * cfg.optim.batch_size)
        rows.append({"part": "data", "path": loader, "pairs_per_s": pairs, "batch": cfg.optim.batch_size,
                     "workers": cfg.data.num_workers if loader == "per_image" else 0, "device": str(device)})
    return rows


def _step_flops(model, x_q, x_k, index) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x_q, x_k, index)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _barrier(spec: str | None) -> None:
    """`barrier` PATH:K, set by the device check's packing: wait until K processes have reached this
    point, so that they time one window."""
    if not spec:
        return
    path, count = spec.rsplit(":", 1)
    Path(f"{path}.{os.getpid()}").touch()
    parent, name = Path(path).parent, Path(path).name
    while len(list(parent.glob(f"{name}.*"))) < int(count):
        time.sleep(0.01)




def bench_train(args: BenchOptions) -> list[dict]:
    rows = []
    for loader in ("batched",) if args.batched_only else ("batched", "per_image"):
        cfg, rt, splits = _setup(args, loader)
        device, cuda = rt.device, rt.device.type == "cuda"
        model, step = training_step(cfg, rt, len(splits.pretrain))  # compiled (if asked) during warm-up: not timed
        views = pretrain_views(cfg, device, splits=splits)
        epochs = (views.epoch(e, indices=True) for e in range(10_000))
        batches = (b for epoch in epochs for b in epoch)
        first = next(batches)
        with rt.autocast():
            flops = _step_flops(model, *rt.layout(*first[:2]), first[2])
        for _ in range(args.warmup):
            step(*next(batches))
        synchronize(device)
        _barrier(args.barrier)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        window_start = time.time()
        timings = []
        for _ in range(args.repeats):
            synchronize(device)
            tic = time.perf_counter()
            for _ in range(args.steps):
                loss = step(*next(batches))
            loss.item()  # one read-back per repeat: the loop itself never syncs
            synchronize(device)
            timings.append(time.perf_counter() - tic)
        window = [window_start, time.time()]
        census = StepCensus()  # one more step, its batch included, counted (untimed: counting slows it)
        with census:
            step(*next(batches))
        counted = census.summary()
        steps_per_s = _median_rate(timings, args.steps)
        row = {"part": "train", "path": loader, "steps_per_s": steps_per_s,
               "images_per_s": steps_per_s * cfg.optim.batch_size, "batch": cfg.optim.batch_size,
               "recipe": cfg.recipe, "arch": cfg.model.arch, "device": str(device),
               "step_tflop": flops / 1e12, "achieved_tflops": flops * steps_per_s / 1e12,
               "images": args.repeats * args.steps * cfg.optim.batch_size, "window": window,
               "ops_per_step": counted["ops"], "syncs_per_step": counted["syncs"],
               "moves_per_step": counted["moves"], "blocking_moves_per_step": counted["blocking_moves"]}
        if cuda:
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
            row.update(gpu=name, bf16_peak_tflops=peak, peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30,
                       fraction_of_peak=(row["achieved_tflops"] / peak) if peak else None)
        rows.append(row)
    return rows


def bench_probe(args: BenchOptions) -> list[dict]:
    if not args.run:
        raise SystemExit("error: bench probe needs --run DIR (a finished pretraining run)")
    from harness.training.probe import load_trained_encoder, probe_backbone

    device = Runtime.for_config(RunConfig()).apply().device  # the run may come from another machine
    cfg, encoder, _ = load_trained_encoder(Path(args.run), device)
    # --set applies to the run's config here, evaluation settings only (e.g. a newer recipe's probe).
    extra = [f"eval.probe_epochs={args.probe_epochs}"] if args.probe_epochs else []
    cfg = with_overrides(cfg, args.overrides + extra, only=EVAL_ONLY)
    cfg.eval.pixel_floor = False
    rows = []
    for protocol in PROBE_PROTOCOLS:
        result = probe_backbone(cfg, encoder.backbone, None, device, protocol)
        rows.append({"part": "probe", "protocol": protocol, "seconds": result["seconds"], "top1": result["top1"],
                     "epochs": cfg.eval.probe_epochs if protocol == "standard" else None, "device": str(device)})
    rows.append({"part": "probe", "protocol": "fast vs standard",
                 "speedup": rows[1]["seconds"] / rows[0]["seconds"],
                 "top1_difference_points": 100 * (rows[0]["top1"] - rows[1]["top1"])})
    return rows


def _started_at() -> float:
    return time.time()


def bench_overhead(args: BenchOptions) -> list[dict]:
    import shutil
    import tempfile

    import submitit

    from harness.execution.slurm import slurm_problem

    kinds = ["debug", "local"] + ([] if slurm_problem() else ["slurm"])
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as folder:
        for kind in kinds:
            executor = submitit.AutoExecutor(folder=str(Path(folder) / kind), cluster=kind)
            executor.update_parameters(timeout_min=5, cpus_per_task=1)
            latencies = []
            for _ in range(args.repeats):
                tic = time.time()
                job = executor.submit(_started_at)
                latencies.append(job.result() - tic)
            rows.append({"part": "overhead", "executor": kind, "submit_to_start_s": statistics.median(latencies),
                         "repeats": args.repeats})
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def bench_diagnostics(args: BenchOptions) -> list[dict]:
    """What the dictionary diagnostics (harness.training.diagnostics) cost against a training epoch, on one
    state: train enough steps to fill the queue, then time `measure()` and the training steps."""
    import tempfile

    from harness.training import diagnostics
    from harness.training.pretrain import PretrainRun

    rows = []
    for subset in (128, 256):
        cfg, rt, splits = _setup(args, "batched")
        cfg.eval.diagnostics_subset = subset
        run = PretrainRun(cfg, Path(tempfile.mkdtemp(prefix="bench-diagnostics-")), rt, 0, 1, splits=splits)
        batches = run.views.epoch(0, 0, indices=True)
        fill = cfg.moco.queue_size // cfg.optim.batch_size  # every sampled age exists
        timed = min(max(args.steps, fill), run.views.steps_per_epoch - args.warmup)
        tic = 0.0
        for i, (x_q, x_k, index) in zip(range(args.warmup + timed), batches):
            if i == args.warmup:
                synchronize(rt.device)
                tic = time.perf_counter()
            run.step(x_q, x_k, index, cfg.scaled_lr(), global_step=i)  # the run's step, seeded as a run's
        synchronize(rt.device)
        step_s = (time.perf_counter() - tic) / timed
        observed = diagnostics.Observed(cfg, run.model, run.views, rt, global_step=args.warmup + timed)
        timings = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            record = diagnostics.measure(observed)
            synchronize(rt.device)
            timings.append(time.perf_counter() - tic)
        epoch_s = step_s * run.views.steps_per_epoch
        rows.append({"part": "diagnostics", "subset": subset, "recipe": cfg.recipe, "device": str(rt.device),
                     "diagnostics_s": statistics.median(timings), "step_s": step_s,
                     "steps_per_epoch": run.views.steps_per_epoch, "epoch_s": epoch_s,
                     "fraction_of_epoch": statistics.median(timings) / epoch_s,
                     "ages": [age for age, _ in record.get("key_consistency_ages", [])]})
    return rows


def bench_census(args: BenchOptions) -> list[dict]:
    """`bench census`: ops, host syncs and copies to the device of one steady-state step of the recipe
    (harness.benchmarks.census), its batch drawn inside the count, on synthetic images (in-memory
    recipes) or `data.root` (folders). Counts, not times: the same on any machine of one torch."""
    from harness.benchmarks.census import step_census

    cfg = make_config(args.recipe, ["runtime.log_every=1000", "eval.knn_every=0", *args.overrides])
    row = step_census(cfg)  # applies the run's runtime itself
    return [{"part": "census", "recipe": cfg.recipe, "batch": row["batch"], "ops_per_step": row["ops"],
             "syncs_per_step": row["syncs"], "moves_per_step": row["moves"],
             "blocking_moves_per_step": row["blocking_moves"], "sync_ops": row["sync_ops"] or None}]


def bench_batch_signature(args: BenchOptions) -> list[dict]:
    """How much a key depends on the batch it is encoded in, through BatchNorm's batch statistics: the
    channel Shuffle BN closes (He et al., Sec. 3.3; a positive key shares its batch's statistics, the
    queue's negatives do not). 512 views of a finished run (--run DIR) are encoded by its key encoder as
    the run encodes keys (train-mode BatchNorm, its shuffle_bn), twice, in two random batch
    compositions; `key_change` is 1 - the mean cosine of an image's two keys, at the run's batch size
    and at 32 (the paper's per-GPU batch)."""
    if not args.run:
        raise SystemExit("error: bench batch-signature needs --run DIR (a finished pretraining run)")
    from harness.training.probe import load_trained_moco

    run = Path(args.run)
    cfg, model, _ = load_trained_moco(run)  # ProbeError (one line) without a checkpoint: the committed examples keep none
    rt = Runtime.for_config(cfg).apply()
    splits = load_tensors(cfg)
    model.to(rt.device).train()  # keys are encoded with the batch's statistics, as in training
    views, _ = pretrain_views(cfg, rt.device, splits=splits).pairs(512)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in sorted({32, cfg.optim.batch_size}):
        keys = []
        for _ in range(2):
            order = torch.randperm(len(views), generator=generator)
            out = torch.empty(len(views), cfg.moco.dim)
            with torch.no_grad():
                for chunk in order.split(batch):
                    out[chunk] = model.encode_keys(views[chunk].to(rt.device)).float().cpu()
            keys.append(out)
        rows.append({"part": "batch-signature", "run": run.name, "shuffle_bn": cfg.moco.shuffle_bn, "batch": batch,
                     "key_change": float(1 - (keys[0] * keys[1]).sum(dim=1).mean())})
    return rows


PARTS = {"batch-signature": bench_batch_signature, "diagnostics": bench_diagnostics, "train": bench_train, "data": bench_data, "probe": bench_probe,
         "overhead": bench_overhead, "census": bench_census, "monitor": bench_monitor,
         "walltime": bench_walltime}


def format_rows(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v is not None]
        lines.append("  ".join(cells))
    return "\n".join(lines)
