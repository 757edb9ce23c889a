"""`python -m harness.bench data` on an image-folder recipe: the input pipeline, old and new side by side.

What a GPU node's CPU cores must sustain is the loader's work per image, so each path's loader side is
timed in this process on one core (0 workers, 1 thread: what one worker process does), decode
included. Rows, in one run on one folder:

  per_image       the classic pipeline (every step per image, float32 out): loader_images_per_s_per_core
  batched         workers' share of the new one (decode, 2 crops + resizes, flips, uint8 out): the same
                  figure; and its device side (colour jitter, grayscale, blur, normalisation, batched
                  on the training device) as device_images_per_s
  device_decode   workers read bytes and draw crops; the device decodes, crops, colours
  speedup         batched / per_image loader rates

The folder is `data.root`, or `--synthetic-jpeg N` photo-like JPEGs of ImageNet's typical size
(500x375, quality 90) written to a temporary folder.
"""
from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from harness.benchmarks.options import BenchOptions
from harness.run.config import make_config
from harness.run.errors import ConfigError
from harness.training.runtime import Runtime, synchronize

IMAGENET_TYPICAL = (500, 375)  # ImageNet-1k's most common size (width, height)


def photo_like(rng, width: int = IMAGENET_TYPICAL[0], height: int = IMAGENET_TYPICAL[1]):
    """An RGB PIL image with a photograph's statistics where the decoder is concerned: smooth colour
    regions, mid-frequency texture and sensor noise (uniform noise would be incompressible and decode
    far slower than a photograph; a flat image far faster). ~100 KB at quality 90, like ImageNet's."""
    import numpy as np
    from PIL import Image

    base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.normal(0, 40, (height // 2, width // 2)) + 128
    texture = Image.fromarray(texture.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    image += (np.asarray(texture, np.float32) - 128)[..., None] * rng.uniform(0.3, 1.0)
    image += rng.normal(0, 9, (height, width, 3))
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def write_synthetic_folder(root: Path, n: int, classes: int = 10, val: int = 0) -> dict:
    """The ImageNet layout with n photo-like JPEGs under train/ (and `val` under val/). Returns the
    files' mean size in bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = []
    for split, count in (("train", n), ("val", max(val, classes))):
        for i in range(count):
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            photo_like(rng).save(buffer, "JPEG", quality=90)
            (folder / f"{i:06d}.JPEG").write_bytes(buffer.getvalue())
            sizes.append(len(buffer.getvalue()))
    return {"images": n, "mean_file_kb": statistics.mean(sizes) / 1e3, "size": list(IMAGENET_TYPICAL)}


def _timed(batches, args) -> float:
    """Seconds per batch: the median over repeats of `steps` batches, after `warmup`."""
    for _ in range(args.warmup):
        next(batches)
    timings = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        timings.append(time.perf_counter() - tic)
    return statistics.median(timings) / args.steps


def _forever(views, raw: bool):
    """Batches of `views` over as many epochs as the timing needs: the DataLoader's output (`raw`,
    the workers' share) or the finished views."""
    from harness.data.folder_views import FolderViews

    for epoch in range(10_000):
        if raw and isinstance(views, FolderViews):
            views.sampler.set_epoch(epoch)
            yield from views.loader()
        else:
            yield from views.epoch(epoch)


def bench_folder_data(args: BenchOptions, cfg_overrides: list[str]) -> list[dict]:
    from harness.data.datasets import pretrain_views

    rows, folder_info = [], None
    with tempfile.TemporaryDirectory(prefix="bench-jpeg-") as scratch:
        overrides = list(cfg_overrides)
        if args.synthetic_jpeg:
            folder_info = write_synthetic_folder(Path(scratch), args.synthetic_jpeg)
            overrides.append(f"data.root={scratch}")
        elif not make_config(args.recipe, overrides).data.root:
            raise ConfigError("data.root: bench data on an image-folder recipe reads a folder: --set data.root=<dir> "
                              "(train/<class>/ images), or --synthetic-jpeg N to write N photo-like JPEGs for it.")
        rates = {}
        for loader in ("per_image", "batched", "device_decode"):
            cfg = make_config(args.recipe, [*overrides, f"data.loader={loader}", "data.num_workers=0"])
            rt = Runtime.for_config(cfg).apply()
            threads = torch.get_num_threads()
            views = pretrain_views(cfg, rt.device)
            batch = cfg.optim.batch_size
            torch.set_num_threads(1)  # the loader's share: one worker process, one core
            per_batch = _timed(_forever(views, raw=True), args)
            rates[loader] = batch / per_batch
            row = {"part": "data", "path": loader, "recipe": cfg.recipe, "batch": batch, "workers": 0,
                   "loader_images_per_s_per_core": rates[loader], "device": str(rt.device),
                   "image_size": cfg.data.image_size, "augmentation": cfg.data.augmentation}
            if loader != "per_image":  # the device's share: colours (and decode) of the loader's batches
                torch.set_num_threads(threads)
                raw = [b for _, b in zip(range(args.steps), _forever(views, raw=True))]
                finish = iter(views.finish(b, 0, i) for i in range(10_000) for b in raw)
                synchronize(rt.device)
                row["device_images_per_s"] = batch / _timed(_synchronized(finish, rt.device), args)
                row["device_threads"] = threads if rt.device.type == "cpu" else None
            torch.set_num_threads(threads)
            rows.append(row)
        rows.append({"part": "data", "path": "speedup", "recipe": rows[0]["recipe"],
                     "batched_over_per_image": rates["batched"] / rates["per_image"],
                     "device_decode_over_per_image": rates["device_decode"] / rates["per_image"],
                     **({"synthetic_jpeg": folder_info} if folder_info else {"root": cfg.data.root})})
    return rows


def _synchronized(batches, device):
    """Each batch once the device has made it (timing what the device does, not what it queued)."""
    for batch in batches:
        synchronize(device)
        yield batch
