"""How many loader cores a GPU study's input pipeline needs, from what the benchmarks measured.

A GPU trains an image-folder recipe at some images/s; each loader core (a DataLoader worker) makes
some images/s of that recipe's views. Their ratio is the cores per GPU the job must have, or the GPUs
wait. Both rates come from the benchmarks' JSON files (results/bench/): `python -m harness.bench data`
(loader_images_per_s_per_core, any machine) and `python -m harness.bench device` on a GPU node (the
recipe's training images/s without a loader in the way). No torch here: the driver reads JSON only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from harness.run.config import RunConfig


def _rows(bench_dir: Path) -> list[tuple[str, dict, dict]]:
    """(file name, file header, row) of every benchmark row, oldest file first."""
    out = []
    for path in sorted(bench_dir.glob("bench-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out += [(path.name, data, row) for row in data.get("rows", []) if isinstance(row, dict)]
    return sorted(out, key=lambda item: item[1].get("time", ""))


def loader_rate(bench_dir: Path, cfg: RunConfig) -> tuple[float, str, str] | None:
    """The newest loader images/s per core for this recipe, loader path, view size and augmentation:
    (rate, machine, file)."""
    found = None
    for name, head, row in _rows(bench_dir):
        if (row.get("part") == "data" and row.get("path") == cfg.data.loader and row.get("recipe") == cfg.recipe
                and row.get("image_size") == cfg.data.image_size and row.get("augmentation") == cfg.data.augmentation
                and row.get("loader_images_per_s_per_core")):
            found = (row["loader_images_per_s_per_core"], head.get("machine", "?"), name)
    return found


def gpu_rate(bench_dir: Path, cfg: RunConfig) -> tuple[float, str, str] | None:
    """The newest training images/s one GPU reached on this recipe (the device check's batched
    throughput, its data already on the device): (rate, GPU, file)."""
    found = None
    for name, _, row in _rows(bench_dir):
        if (row.get("check") == "throughput batched" and row.get("recipe") == cfg.recipe and row.get("gpu")
                and row.get("images_per_s")):
            found = (row["images_per_s"], row["gpu"], name)
    return found


def loader_cores_line(cfg: RunConfig, gpus: int, cpus: int, bench_dir: Path) -> str:
    """The dry run's line on the input pipeline of an image-folder study on GPUs."""
    loader = loader_rate(bench_dir, cfg)
    measure = (f"python -m harness.bench data --recipe {cfg.recipe} --synthetic-jpeg 512 --set runtime.threads=1 "
               f"(or --set data.root=<your folder>)")
    if loader is None:
        return (f"input pipeline ({cfg.data.loader}): the loader's images/s per core is not measured for this "
                f"recipe at {cfg.data.image_size} px: {measure}")
    rate, machine, file = loader
    per_gpu = cpus / max(gpus, 1)
    said = (f"input pipeline ({cfg.data.loader}): a loader core makes {rate:.0f} images/s ({machine}; "
            f"{bench_dir / file})")
    trained = gpu_rate(bench_dir, cfg)
    if trained is None:
        return (f"{said}: {math.ceil(1000 / rate)} cores per GPU for each 1000 images/s it trains; this recipe's "
                f"GPU rate is not measured yet (python -m harness.bench device on a GPU node); the job gives "
                f"{per_gpu:.0f} CPUs per GPU")
    gpu_images, gpu, gfile = trained
    need = math.ceil(gpu_images / rate)
    verdict = "enough" if per_gpu >= need else (
        "too few: the GPUs would wait on their input; raise resources.cpus (and data.num_workers) or try "
        "data.loader=device_decode")
    return (f"{said}; a GPU trains {gpu_images:.0f} images/s ({gpu}; {bench_dir / gfile}): {need} loader cores per "
            f"GPU needed, the job gives {per_gpu:.0f} CPUs per GPU ({verdict})")
