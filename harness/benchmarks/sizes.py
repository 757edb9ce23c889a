"""The device check's two sizes: full on a GPU, small (every path in seconds) on a CPU."""
from __future__ import annotations

import torch

RECIPES = ("cifar10-r18", "imagenet-r50-v2")

# Sizes: full on a GPU; small runs every path in seconds on 2 CPU cores (CI), with a tiny ResNet in
# place of cifar10-r18's ResNet-18, and torch.compile through dynamo and AOT autograd without
# inductor's C++ code generation, which alone takes a minute there (tests/model/test_moco.py compiles
# with inductor).
FULL = {"steps": 20, "warmup": 5, "repeats": 3, "synthetic": 4096, "check_steps": 5, "overrides": {},
        "compile_backend": "inductor", "packing": (1, 2, 4)}
SMALL = {"steps": 2, "warmup": 1, "repeats": 1, "synthetic": 64, "check_steps": 3, "compile_backend": "aot_eager",
         "packing": (1, 2),  # every path of the packing run; 4 processes on 2 cores only add start-ups
         "overrides": {
    "cifar10-r18": ["optim.batch_size=16", "moco.queue_size=256", "moco.bn_splits=4", "data.num_workers=1",
                    "model.arch=resnet_tiny", "model.tiny_widths=[16,32,64]"],
    "imagenet-r50-v2": ["optim.batch_size=8", "moco.queue_size=256", "data.image_size=32", "data.num_workers=1"]}}


def device_size(name: str) -> dict:
    if name == "auto":
        name = "full" if torch.cuda.is_available() else "small"
    size = FULL if name == "full" else SMALL
    cpu = [] if torch.cuda.is_available() else ["runtime.device=cpu"]  # a GPU recipe, checked on a CPU
    return {**size, "name": name, "overrides": {r: [*size["overrides"].get(r, []), *cpu] for r in RECIPES}}


def base_overrides(size: dict, recipe: str) -> list[str]:
    # fp32 eager unless a variant says otherwise; the runtime's "auto" would pick bf16 on a GPU
    return [*size["overrides"].get(recipe, []), "runtime.precision=fp32", "runtime.channels_last=no",
            "runtime.compile=false", "data.loader=batched"]
