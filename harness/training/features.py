"""Feature extraction for evaluation: the query encoder in eval mode, no augmentation."""
from __future__ import annotations

import copy

import torch
from torch import nn

from harness.data import datasets as data_mod
from harness.model.distributed import chunk_of, gather_rows
from harness.run.datafiles import CHANNELS
from harness.training.runtime import inference_autocast


@torch.no_grad()
def extract(model: nn.Module, batches, device, empty_input: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated (features, labels) of `model` in eval mode over (image, label) batches.
    `empty_input`: the shape of one image, to give zero rows of the right width when there are no
    batches (a rank whose shard is empty must still take part in the gather).

    Runs a channels_last copy: inference convolutions are faster in that layout (2.3x with oneDNN on
    the 2-core CI CPU, `python -m harness.bench probe`), and the caller's model is left untouched.
    """
    frozen = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    feats, labels = [], []
    for x, y in batches:
        with inference_autocast(device):
            feats.append(frozen(x.to(device).contiguous(memory_format=torch.channels_last)).float())
        labels.append(y.to(device))
    if not feats and empty_input is not None:
        x = torch.zeros((0, *empty_input), device=device).contiguous(memory_format=torch.channels_last)
        with inference_autocast(device):
            feats.append(frozen(x).float())
        labels.append(torch.zeros(0, dtype=torch.long, device=device))
    return torch.cat(feats), torch.cat(labels)


def split_batches(cfg, split: str, device, splits=None, limit: int | None = None, part: tuple[int, int] = (0, 1)):
    """(image, label) batches of the labelled 'train' or 'test' split, evaluation view: at most
    `limit` images (a seeded subset, the same in every run), and of those the chunk of rank `part[0]`
    of `part[1]` (distributed.chunk_of) so that every rank extracts its share."""
    if cfg.data.dataset == "imagefolder":
        return data_mod.folder_eval_loader(cfg, "train" if split == "train" else "val", device, limit=limit,
                                           share=lambda n: chunk_of(n, *part))
    images = getattr(splits, f"{split}_images")
    labels = getattr(splits, f"{split}_labels")
    pick = data_mod.eval_subset(len(images), limit, split)
    if pick is not None:
        images, labels = images[pick], labels[pick]
    rows = chunk_of(len(images), *part)
    return data_mod.labelled_batches(images[rows], labels[rows], cfg, device)


def extract_split(model: nn.Module, cfg, split: str, device, splits=None, limit: int | None = None,
                  rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract` of a split's evaluation images, sharded: each rank encodes its chunk, and every rank
    returns the whole (gathered in rank order, i.e. the order of one process)."""
    image = (CHANNELS[cfg.data.dataset], cfg.data.image_size, cfg.data.image_size)
    feats, labels = extract(model, split_batches(cfg, split, device, splits, limit, (rank, world)), device, image)
    return gather_rows(feats), gather_rows(labels)


def encoder_features(model: nn.Module, which: str) -> nn.Module:
    """The module whose output is evaluated: backbone (pooled features) or head (q before L2)."""
    return model.backbone if which == "backbone" else model
