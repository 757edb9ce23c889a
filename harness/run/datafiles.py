"""Where a dataset's files are, and whether they are there: checked by the driver before anything
is submitted, so no torch here (a driver's start stays cheap; `data` loads the files)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from harness.run.config import RunConfig
from harness.run.errors import ConfigError

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def default_root(dataset: str) -> Path:
    base = Path(os.environ.get("HARNESS_DATA", "~/.cache/harness/data")).expanduser()
    return base / dataset


def missing_files(dataset: str, root: Path, expected: str) -> ConfigError:
    return ConfigError(
        f"data.root: {dataset} files not found under {root} (expected {expected}). This machine cannot "
        f"download them: copy the files there, or set data.root=<dir> (or HARNESS_DATA=<dir>).")


def _fashion_mnist_dir(root: str | None) -> Path | None:
    candidates = [Path(root).expanduser()] if root else [FASHION_MNIST_DEBIAN, default_root("fashion_mnist")]
    for base in candidates:
        for sub in (base, base / "FashionMNIST" / "raw"):
            for suffix in (".gz", ""):
                if (sub / f"train-images-idx3-ubyte{suffix}").exists():
                    return sub
    return None


def fashion_mnist_files(root: str | None) -> Path:
    """The folder holding Fashion-MNIST's IDX files, or the error that says where to put them."""
    where = _fashion_mnist_dir(root)
    if where is None:
        shown = root or f"{FASHION_MNIST_DEBIAN} or {default_root('fashion_mnist')}"
        raise missing_files("Fashion-MNIST", Path(shown), "train-images-idx3-ubyte.gz etc.; "
                       "on Debian: apt-get install dataset-fashion-mnist")
    return where


def check_dataset(cfg: RunConfig) -> None:
    """Cheap existence check, run before anything is submitted (raises ConfigError)."""
    d = cfg.data
    if d.dataset == "fashion_mnist":
        fashion_mnist_files(d.root)
    elif d.dataset == "imagefolder":
        folder_root(d.root)
    else:
        base = Path(d.root).expanduser() if d.root else default_root(d.dataset)
        expected = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}
        if not (base / expected[d.dataset]).exists():
            raise missing_files(d.dataset, base, expected[d.dataset] + "/")


def folder_root(root: str | None) -> Path:
    if not root:
        raise ConfigError("data.root: the imagefolder dataset needs data.root=<dir> holding train/ and val/ "
                          "class folders (the ImageNet layout).")
    base = Path(root).expanduser()
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise missing_files("imagefolder", base, f"{split}/<class>/<image> folders")
    return base


# torchvision.datasets.folder.IMG_EXTENSIONS, without importing torchvision (the driver stays light).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@functools.lru_cache(maxsize=16)
def folder_image_count(root: str, split: str = "train") -> int:
    """Images in an image folder's split, as ImageFolder would find them (one directory walk per
    class; ImageNet's 1.28M files take seconds, once per process)."""
    count = 0
    for class_dir in os.scandir(folder_root(root) / split):
        if class_dir.is_dir():
            for _, _, files in os.walk(class_dir.path, followlinks=True):
                count += sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in files)
    return count


CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "stl10": 3, "imagefolder": 3}
FULL_PRETRAIN_SIZE = {"fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000, "stl10": 105000}


def pretrain_size(cfg: RunConfig) -> int | None:
    """Images per pretraining epoch, where known without reading the files (in-memory datasets)."""
    full = FULL_PRETRAIN_SIZE.get(cfg.data.dataset)
    if full is None:
        return None
    return min(full, cfg.data.train_subset) if cfg.data.train_subset else full
