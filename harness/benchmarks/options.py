"""A benchmark's options: what the parts read of `python -m harness.bench`'s command line."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchOptions:
    """What a benchmark part reads of the command line (`python -m harness.bench`), and nothing else."""
    recipe: str = "fmnist-tiny"
    overrides: list[str] = field(default_factory=list)
    steps: int = 10  # timed steps per repeat
    warmup: int = 3
    repeats: int = 3
    synthetic: int = 0  # N random images of the dataset's shape instead of its files
    synthetic_jpeg: int = 0  # N photo-like JPEGs in a temporary folder (image-folder recipes)
    run: str | None = None  # a finished run directory (probe part)
    probe_epochs: int | None = None
    size: str = "auto"  # device part: full | small | auto
    batched_only: bool = False  # packing's processes time the batched path alone
    barrier: str | None = None  # PATH:K, packing's common start
