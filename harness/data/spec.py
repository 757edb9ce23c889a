"""What every view source shares: the one source of its random choices (a generator seeded by a
stable hash of a key), the epoch's order and each rank's share of a step, the datasets'
normalisation, and the recipe with the run's crop range."""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import torch

from harness.data.augment import RECIPES, AugmentSpec
from harness.run.config import RunConfig

# (seed key, image index): what a batch sampler hands a worker for one image.
Key = tuple[tuple, int]

NORMALIZATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def seeded_generator(*key) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of `key` (same on every machine and run)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def view_spec(cfg: RunConfig) -> AugmentSpec:
    """The pretraining views' augmentation: the named recipe with data.crop_scale as its crop range."""
    return dataclasses.replace(RECIPES[cfg.data.augmentation], crop_scale=tuple(cfg.data.crop_scale))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of the n training images, the same on every rank."""
    return torch.randperm(n, generator=seeded_generator("order", seed, epoch))


class EpochBatches:
    """Each step's share of this rank, every view source's: a batch sampler (the persistent
    DataLoader of image folders iterates it anew every epoch, from `start_step` of the epoch it was
    last told), and the rows of the epoch's order for in-memory batches."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.per_rank = batch // world
        self.steps_per_epoch = n // batch  # drop_last: K % B stays aligned
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def rows(self, step: int) -> slice:
        """This rank's share of the step's global batch, as positions in the epoch's order."""
        lo = step * self.batch + self.rank * self.per_rank
        return slice(lo, lo + self.per_rank)

    def keys(self, epoch: int, step: int, order: list | None = None) -> list[Key]:
        order = order if order is not None else self.order(epoch)
        return [((self.seed, epoch, step), i) for i in order[self.rows(step)]]

    def order(self, epoch: int) -> list[int]:
        return epoch_order(self.n, self.seed, epoch).tolist()

    def __iter__(self) -> Iterator[list[Key]]:
        order = self.order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            yield self.keys(self.epoch, step, order)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step
