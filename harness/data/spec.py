"""What every view source shares: the one source of its random choices (a generator seeded by a
stable hash of a key), the datasets' normalisation, and the recipe with the run's crop range."""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from harness.data.augment import RECIPES, AugmentSpec
from harness.run.config import RunConfig

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
