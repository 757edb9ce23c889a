"""`python -m harness.bench device`: the prepared check for a lent accelerator, one command.

Device windows are short, so everything worth knowing about a GPU is measured in one run (under
5 minutes on one GPU) and written as one JSON and one table:

  fast paths   bf16 autocast, channels_last and torch.compile, each against fp32 eager on the same
               batches from the same start: every step's loss and the queue after the last step,
               within the tolerances below (bf16 rounds, the others only reorder float sums)
  throughput   cifar10-r18 and imagenet-r50-v2 on synthetic images, batched vs per-image data
               path: images/s, achieved TFLOP/s, peak device memory
  packing      1, 2 and 4 training processes of cifar10-r18 on the device at once: aggregate
               images/s (what several trials per GPU would gain; 1 and 2 at the small size)
  input        the image-folder pipeline on photo-like JPEGs: each path's loader images/s per core and
               its device side's images/s (colours; for device_decode nvjpeg decode, crops and colours),
               and device_decode's views against the worker path's on the device
  GPU paths    resume on the device, NCCL gathers, syncs per step, layout x cudnn.benchmark,
               bf16 vs fp32 logits (harness.benchmarks.gpu_checks)

On a machine without a GPU it runs the same code at small sizes (`--size small`, the default
there), which is how CI tests it.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from harness.benchmarks import gpu_checks
from harness.benchmarks.options import BenchOptions
from harness.benchmarks.sizes import RECIPES, base_overrides, device_size
from harness.data.datasets import pretrain_views
from harness.run import process
from harness.run.config import make_config
from harness.training.runtime import Runtime

# |loss - fp32 loss| / fp32 loss at any step, and max |queue - fp32 queue| (unit-norm keys).
TOLERANCE = {"bf16 autocast": (0.05, 0.05), "channels_last": (1e-3, 1e-3), "torch.compile": (1e-3, 1e-3)}
VARIANTS = {"fp32 eager": [], "bf16 autocast": ["runtime.precision=bf16"],
            "channels_last": ["runtime.channels_last=yes"], "torch.compile": ["runtime.compile=true"]}
def _train_steps(recipe: str, overrides: list[str], size: dict) -> tuple[list[float], torch.Tensor]:
    """`check_steps` MoCo steps from seed 0: each step's loss, and the queue after the last."""
    from harness.data.synthetic import synthetic_splits
    from harness.training.step import training_step

    cfg = make_config(recipe, overrides)
    rt = Runtime.for_config(cfg).apply()
    splits = synthetic_splits(cfg, size["synthetic"])
    model, step = training_step(cfg, rt, len(splits.pretrain), size["compile_backend"])
    batches = pretrain_views(cfg, rt.device, splits=splits).epoch(0, indices=True)
    losses = [step(*batch).item() for _, batch in zip(range(size["check_steps"]), batches)]
    return losses, model.queue.detach().float().cpu()


def check_fast_paths(size: dict, recipe: str = "cifar10-r18") -> list[dict]:
    reference = None
    rows = []
    for variant, extra in VARIANTS.items():
        tic = time.perf_counter()
        losses, queue = _train_steps(recipe, [*base_overrides(size, recipe), *extra], size)
        seconds = time.perf_counter() - tic
        if reference is None:
            reference = losses, queue
            rows.append({"part": "device", "check": variant, "recipe": recipe, "losses": losses, "seconds": seconds})
            continue
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, reference[0]))
        queue_diff = float((queue - reference[1]).abs().max())
        loss_tol, queue_tol = TOLERANCE[variant]
        rows.append({"part": "device", "check": variant, "recipe": recipe, "losses": losses, "seconds": seconds,
                     **({"backend": size["compile_backend"]} if variant == "torch.compile" else {}),
                     "loss_rel_diff": loss_diff, "queue_max_diff": queue_diff, "tolerance": [loss_tol, queue_tol],
                     "ok": loss_diff <= loss_tol and queue_diff <= queue_tol})
    return rows


def throughput(size: dict, recipe: str) -> list[dict]:
    from harness.benchmarks.parts import bench_train

    args = BenchOptions(recipe=recipe, overrides=[*size["overrides"].get(recipe, [])], steps=size["steps"],
                        warmup=size["warmup"], repeats=size["repeats"], synthetic=size["synthetic"])
    return [{**row, "part": "device", "check": f"throughput {row['path']}"} for row in bench_train(args)]


def _packed(options: BenchOptions, out: str) -> None:
    """One of packing's processes: bench train's batched path, its row (or its failure) to `out`."""
    import traceback

    from harness.benchmarks.parts import bench_train

    try:
        Path(out).write_text(json.dumps(bench_train(options)[0]))
    except BaseException:
        Path(f"{out}.err").write_text(traceback.format_exc())
        raise


def packing(size: dict, recipe: str = "cifar10-r18") -> list[dict]:
    """k benchmark processes on one device, started together and timed over the same window (a file
    barrier after warm-up): the aggregate images/s of k trials sharing the device."""
    rows = []
    context = process.torch_forkserver()  # k processes, each with its own device context
    for k in size["packing"]:
        with tempfile.TemporaryDirectory() as tmp:
            options = BenchOptions(recipe=recipe, overrides=[*size["overrides"].get(recipe, [])],
                                   steps=size["steps"] * 2, warmup=size["warmup"], repeats=1,
                                   synthetic=size["synthetic"], batched_only=True, barrier=f"{tmp}/barrier:{k}")
            procs = [context.Process(target=_packed, args=(options, f"{tmp}/p{i}.json")) for i in range(k)]
            for p in procs:
                p.start()
            for i, p in enumerate(procs):
                p.join(timeout=600)
                if p.exitcode != 0:
                    err = Path(f"{tmp}/p{i}.json.err")
                    for q in procs:
                        q.kill()
                        q.join()
                    how = "still running after 600 s" if p.exitcode is None else f"exit {p.exitcode}"
                    raise RuntimeError(f"packing with {k} processes: a benchmark process failed ({how}): "
                                       f"{err.read_text()[-1500:] if err.exists() else 'no traceback'}")
            results = [json.loads(Path(f"{tmp}/p{i}.json").read_text()) for i in range(k)]
        window = max(r["window"][1] for r in results) - min(r["window"][0] for r in results)
        images = sum(r["images"] for r in results)
        rows.append({"part": "device", "check": f"packing {k}", "recipe": recipe, "processes": k,
                     "aggregate_images_per_s": images / window,
                     "per_process_images_per_s": [r["images_per_s"] for r in results]})
    base = rows[0]["aggregate_images_per_s"]
    for row in rows:
        row["speedup_vs_one"] = row["aggregate_images_per_s"] / base
    return rows


def input_pipeline(size: dict, recipe: str = "imagenet-r50-v2") -> list[dict]:
    """bench data's folder rows on the device, and device_decode's views against the worker path's."""
    from harness.benchmarks.folders import bench_folder_data, write_synthetic_folder

    full = size["name"] == "full"
    overrides = [*size["overrides"].get(recipe, [])] if not full else []
    overrides += ["optim.batch_size=64"] if full else []
    args = BenchOptions(recipe=recipe, synthetic_jpeg=512 if full else 24, warmup=1, steps=2 if full else 1,
                        repeats=2 if full else 1)
    rows = [{**row, "part": "input", "check": f"input {row['path']}"}
            for row in bench_folder_data(args, overrides)]
    with tempfile.TemporaryDirectory(prefix="check-jpeg-") as root:
        write_synthetic_folder(Path(root), 64 if full else 16)
        views = []
        for loader in ("batched", "device_decode"):
            cfg = make_config(recipe, [*overrides, f"data.root={root}", f"data.loader={loader}", "data.num_workers=0",
                                       "optim.batch_size=16"])
            rt = Runtime.for_config(cfg).apply()
            views.append(pretrain_views(cfg, rt.device).batch_at(0, 0))
        diff = torch.cat([(a - b).abs().flatten().float().cpu() for a, b in zip(views[0][:2], views[1][:2])])
    rows.append({"part": "input", "check": "input device_decode vs batched", "recipe": recipe,
                 "device": str(views[0][0].device), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                 "ok": bool(diff.mean() < 0.05) and torch.equal(views[0][2].cpu(), views[1][2].cpu())})
    return rows


def run(args: BenchOptions) -> list[dict]:
    size = device_size(args.size)
    rows = check_fast_paths(size)
    for recipe in RECIPES:
        rows += throughput(size, recipe)
    rows += packing(size)
    rows += input_pipeline(size)
    rows += gpu_checks.run(size)
    failed = [r["check"] for r in rows if r.get("ok") is False]
    rows.append({"part": "device", "check": "summary", "size": size["name"],
                 "fast_paths": "all within tolerance" if not failed else f"OUT OF TOLERANCE: {', '.join(failed)}"})
    return rows


def table(rows: list[dict]) -> str:
    """The check as one Markdown table (what the README shows)."""
    def fmt(value, digits=3):
        return "" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    lines = ["| check | recipe | result |", "|---|---|---|"]
    for r in rows:
        if gpu_checks.describe(r) is not None:
            result = gpu_checks.describe(r)
        elif r["check"] == "fp32 eager":
            result = f"reference: losses {', '.join(fmt(x, 5) for x in r['losses'])}"
        elif r["check"] == "input speedup":
            result = f"loader per core: batched {r['batched_over_per_image']:.1f}x per_image"
        elif r["check"] == "input device_decode vs batched":
            result = (f"{'ok' if r['ok'] else 'DIFFERENT'}: views differ by {r['mean_abs_diff']:.3g} on average "
                      f"(max {r['max_abs_diff']:.3g}, normalised units) on {r['device']}")
        elif r["check"].startswith("input"):
            device = (f", device side {r['device_images_per_s']:.0f} images/s on {r['device']}"
                      if r.get("device_images_per_s") else "")
            result = f"loader {r['loader_images_per_s_per_core']:.0f} images/s per core{device}"
        elif "ok" in r:
            result = (f"{'ok' if r['ok'] else 'OUT OF TOLERANCE'}: loss rel. diff {fmt(r['loss_rel_diff'])} "
                      f"(tol. {r['tolerance'][0]:g}), queue max diff {fmt(r['queue_max_diff'])} "
                      f"(tol. {r['tolerance'][1]:g}), {r['seconds']:.1f} s")
        elif r["check"].startswith("throughput"):
            memory = f", peak memory {r['peak_memory_gb']:.1f} GB" if r.get("peak_memory_gb") is not None else ""
            result = (f"{r['images_per_s']:.0f} images/s at batch {r['batch']}, {r['achieved_tflops']:.2f} TFLOP/s"
                      f"{memory}")
        elif r["check"].startswith("packing"):
            result = (f"{r['aggregate_images_per_s']:.0f} images/s together ({r['speedup_vs_one']:.2f}x one "
                      f"process)")
        else:
            result = f"{r['size']} size; fast paths {r['fast_paths']}"
        lines.append(f"| {r['check']} | {r.get('recipe', '')} | {result} |")
    return "\n".join(lines)
