"""Random images of a dataset's shape, for machines without its files (a lent GPU, the estimate's
timed steps, the benchmarks)."""
from __future__ import annotations

import torch

from harness.data.datasets import TensorSplits
from harness.run.datafiles import CHANNELS

SYNTHETIC_SHAPE = {"cifar10": (32, 32), "cifar100": (32, 32), "stl10": (96, 96), "fashion_mnist": (28, 28)}


def synthetic_splits(cfg, n: int) -> TensorSplits:
    """Random uint8 images of the dataset's shape (for machines without the files, e.g. a lent GPU).
    Image folders (ImageNet layout) get square images 8/7 of the crop size, as ImageNet's 256 for 224."""
    g = torch.Generator().manual_seed(0)
    dataset = cfg.data.dataset
    side = round(cfg.data.image_size * 8 / 7)
    h, w = SYNTHETIC_SHAPE.get(dataset, (side, side))
    images = torch.randint(0, 256, (n, CHANNELS[dataset], h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TensorSplits(images, images, labels, images[: n // 5], labels[: n // 5])
