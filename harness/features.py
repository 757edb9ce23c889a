"""Feature extraction for evaluation: the query encoder in eval mode, no augmentation."""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import data as data_mod
from .runtime import inference_autocast


@torch.no_grad()
def extract(model: nn.Module, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated (features, labels) of `model` in eval mode over (image, label) batches.

    Runs a channels_last copy: inference convolutions are faster in that layout (2.3x with oneDNN on
    the 2-core CI CPU, `python -m harness.bench probe`), and the caller's model is left untouched.
    """
    frozen = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    feats, labels = [], []
    for x, y in batches:
        with inference_autocast(device):
            feats.append(frozen(x.to(device).contiguous(memory_format=torch.channels_last)).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def split_batches(cfg, split: str, device, splits=None, limit: int | None = None):
    """(image, label) batches of the labelled 'train' or 'test' split, evaluation view."""
    if cfg.data.dataset == "imagefolder":
        return data_mod.folder_eval_loader(cfg, "train" if split == "train" else "val", device)
    images = getattr(splits, f"{split}_images")
    labels = getattr(splits, f"{split}_labels")
    if limit is not None and limit < len(images):
        pick = torch.randperm(len(images), generator=data_mod.seeded_generator("eval", split))[:limit]
        images, labels = images[pick], labels[pick]
    return data_mod.labelled_batches(images, labels, cfg, device)


def encoder_features(model: nn.Module, which: str) -> nn.Module:
    """The module whose output is evaluated: backbone (pooled features) or head (q before L2)."""
    return model.backbone if which == "backbone" else model
