"""Datasets by name, and the two-view batch sources the trainer iterates.

In-memory datasets (Fashion-MNIST, CIFAR-10/100, STL-10) are held once as a uint8 tensor on the
training device and augmented there in batch (`InMemoryViews`). Image folders (ImageNet,
ImageNet-100) are cropped in DataLoader workers and coloured on the device (`folder_views`);
`LoaderViews` is the classic per-image pipeline, kept as the comparison path (`data.loader=per_image`).

Every random choice of a step (data order, augmentation) derives from (seed, epoch, step, rank),
so a run resumed mid-epoch sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import gzip
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data.augment import BatchAugment, center_view, eval_transform, per_image_transform, to_device
from harness.data.spec import NORMALIZATION, EpochBatches, epoch_order, seeded_generator, view_spec  # noqa: F401 (callers ask datasets)
from harness.run import runio
from harness.run.config import RunConfig
from harness.run.datafiles import CHANNELS, default_root, fashion_mnist_files, folder_root, missing_files, pretrain_size  # noqa: F401
from harness.run.errors import ConfigError

IN_MEMORY = {"fashion_mnist", "cifar10", "cifar100", "stl10"}

NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}


# ---------------------------------------------------------------- loading files

@dataclass
class TensorSplits:
    """uint8 images (N, C, H, W) and int64 labels; `pretrain` may hold unlabelled images."""
    pretrain: torch.Tensor
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _idx_file(path: Path) -> Path | bytes:
    """An IDX file to map: the file itself, or for a gzipped one its copy decompressed once into the
    cache (named by the file's size and time, so a changed file is decompressed again): every trial
    process reads the dataset, and gunzipping Fashion-MNIST's 26 MB took ~0.3 s of CPU each time.
    The decompressed bytes themselves where the cache cannot be written."""
    if path.suffix != ".gz":
        return path
    stat = path.stat()
    cached = runio.cache_dir() / "idx" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if cached.exists():
        return cached
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    try:
        runio.write_atomic_bytes(cached, raw)
    except OSError:  # a read-only cache only costs the decompression next time
        return raw
    return cached


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file as a uint8 tensor (images (N, 1, H, W)) or int64 labels. Images are a private
    memory map of the file: a run of a subset reads the pages of its images, not 47 MB (and three
    copies of them: ~0.13 s of CPU in every trial process); `load_tensors` copies what it keeps."""
    source = _idx_file(path)
    if isinstance(source, Path):
        with open(source, "rb") as fh:  # ACCESS_COPY: writable for torch, and no write reaches the file
            buffer: mmap.mmap | bytearray = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    else:
        buffer = bytearray(source)
    magic, count = struct.unpack(">II", buffer[:8])
    if magic == 2049:  # labels
        return torch.frombuffer(buffer, dtype=torch.uint8, offset=8, count=count).long()
    if magic == 2051:  # images
        rows, cols = struct.unpack(">II", buffer[8:16])
        return torch.frombuffer(buffer, dtype=torch.uint8, offset=16, count=count * rows * cols).view(count, 1, rows, cols)
    raise ConfigError(f"data.root: {path} is not an IDX file (magic {magic}).")


def _load_fashion_mnist(root: str | None) -> TensorSplits:
    where = fashion_mnist_files(root)
    gz = ".gz" if (where / "train-images-idx3-ubyte.gz").exists() else ""
    read = lambda stem: _read_idx(where / f"{stem}{gz}")  # noqa: E731
    train_x, train_y = read("train-images-idx3-ubyte"), read("train-labels-idx1-ubyte")
    return TensorSplits(train_x, train_x, train_y, read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte"))


def _load_torchvision(dataset: str, root: str | None) -> TensorSplits:
    from torchvision import datasets

    base = Path(root).expanduser() if root else default_root(dataset)
    expected = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "stl10": "stl10_binary/"}
    if not (base / expected[dataset]).exists():
        raise missing_files(dataset, base, expected[dataset])

    def hwc(array) -> torch.Tensor:
        return torch.as_tensor(array).permute(0, 3, 1, 2).contiguous()

    if dataset == "stl10":
        unl = datasets.STL10(str(base), split="unlabeled", download=False)
        tr = datasets.STL10(str(base), split="train", download=False)
        te = datasets.STL10(str(base), split="test", download=False)
        train_x = torch.as_tensor(tr.data)
        pretrain = torch.cat([train_x, torch.as_tensor(unl.data)])  # 'train+unlabeled', as the paper
        return TensorSplits(pretrain, train_x, torch.as_tensor(tr.labels).long(),
                            torch.as_tensor(te.data), torch.as_tensor(te.labels).long())
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    tr, te = cls(str(base), train=True, download=False), cls(str(base), train=False, download=False)
    train_x = hwc(tr.data)
    return TensorSplits(train_x, train_x, torch.tensor(tr.targets), hwc(te.data), torch.tensor(te.targets))


def _subset(n_total: int, n: int | None, seed_key: str) -> torch.Tensor | None:
    if n is None or n >= n_total:
        return None
    return torch.randperm(n_total, generator=seeded_generator("subset", seed_key))[:n].sort().values


def _take(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor | None,
          mapped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The subset's images and labels (copies); all of a mapped file's images copied into memory,
    so a run never depends on the file staying as it was."""
    if idx is not None:
        return images[idx], labels[idx]
    return (images.clone() if mapped else images), labels


def load_tensors(cfg: RunConfig) -> TensorSplits:
    d = cfg.data
    if d.dataset == "imagefolder":  # was a KeyError deep in _load_torchvision
        raise ConfigError("data.dataset: an image folder is read file by file (harness.data.folder_views), not held in "
                          "memory; a benchmark of it takes --synthetic N (random images in memory), or for "
                          "`bench data` data.root=<folder> or --synthetic-jpeg N.")
    mapped = d.dataset == "fashion_mnist"  # its images are a map of the file until copied (_read_idx)
    splits = _load_fashion_mnist(d.root) if mapped else _load_torchvision(d.dataset, d.root)
    # Subsets are fixed (seeded by dataset name, not by the run seed) so every run of a study sees
    # the same images.
    same_pretrain = splits.pretrain is splits.train_images
    idx = _subset(len(splits.train_images), d.train_subset, d.dataset + "/train")
    splits.train_images, splits.train_labels = _take(splits.train_images, splits.train_labels, idx, mapped)
    if same_pretrain:
        splits.pretrain = splits.train_images
    else:
        pidx = _subset(len(splits.pretrain), d.train_subset, d.dataset + "/pretrain")
        if pidx is not None:
            splits.pretrain = splits.pretrain[pidx]
    tidx = _subset(len(splits.test_images), d.test_subset, d.dataset + "/test")
    splits.test_images, splits.test_labels = _take(splits.test_images, splits.test_labels, tidx, mapped)
    return splits


# ---------------------------------------------------------------- two-view sources


class InMemoryViews:
    """Pretraining batches from a uint8 tensor on the device, both views augmented in batch."""

    def __init__(self, images: torch.Tensor, cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1):
        self.images = images.to(device)
        self.cfg, self.rank, self.world = cfg, rank, world
        mean, std = NORMALIZATION[cfg.data.dataset]
        self.augment = BatchAugment(view_spec(cfg), cfg.data.image_size, mean, std)
        self.size = len(images)  # training images (the memory bank's entries)
        self.sampler = EpochBatches(len(images), cfg.optim.batch_size, rank, world, cfg.runtime.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} is larger than the "
                              f"{len(images)} training images; lower it or enlarge data.train_subset.")

    def epoch(self, epoch: int, start_step: int = 0, indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """(view 1, view 2) batches; with `indices`, also the images' indices in the training set."""
        order = epoch_order(self.size, self.cfg.runtime.seed, epoch)
        for step in range(start_step, self.steps_per_epoch):
            views = self._batch(order, epoch, step)
            yield views if indices else views[:2]

    def _batch(self, order: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, ...]:
        """Both views of this rank's share of the step: the indices and both views' parameters (drawn
        on the CPU from the step's generator, view 1 then view 2) reach the device in two copies."""
        idx = to_device(order[self.sampler.rows(step)], self.images.device)
        images = self.images[idx]
        g = seeded_generator("augment", self.cfg.runtime.seed, epoch, step, self.rank)
        tables = to_device(torch.stack([self.augment.draw(images.shape, g) for _ in range(2)]), images.device)
        return self.augment.apply(images, tables[0]), self.augment.apply(images, tables[1]), idx

    def batch_at(self, epoch: int, step: int) -> tuple[torch.Tensor, ...]:
        """(view 1, view 2, indices) of this rank at (epoch, step), exactly as training saw them."""
        return self._batch(epoch_order(self.size, self.cfg.runtime.seed, epoch), epoch, step)

    def pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of a fixed seeded subset of n training images (the diagnostics' own generator)."""
        g = seeded_generator("diagnostics", self.cfg.runtime.seed)
        idx = torch.randperm(len(self.images), generator=g)[:n].to(self.images.device)
        return self.augment(self.images[idx], g), self.augment(self.images[idx], g)


class _TwoViews(torch.utils.data.Dataset):
    """Image i -> two views; its sampler passes (seed key, index) so each item's augmentation is
    reproducible whichever worker draws it."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        seed_key, index = key
        image = self.images[index]
        if isinstance(image, tuple):  # ImageFolder: (PIL image, label)
            image = image[0]
        elif isinstance(image, torch.Tensor):  # in-memory uint8 CHW -> PIL, as a classic pipeline would
            from torchvision.transforms.v2.functional import to_pil_image

            image = to_pil_image(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeded_generator("item", *seed_key, index).initial_seed())
            return self.transform(image), self.transform(image)


class LoaderViews:
    """Pretraining batches through a DataLoader with per-image (PIL) transforms in worker processes:
    the path for image folders, and the comparison path for in-memory datasets."""

    def __init__(self, cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1, images=None):
        mean, std = NORMALIZATION[cfg.data.dataset]
        transform = per_image_transform(view_spec(cfg), cfg.data.image_size, mean, std)
        if images is None:
            from harness.data.folder_views import image_folder

            images = image_folder(cfg, "train")
        self.dataset = _TwoViews(images, transform)
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.size = len(self.dataset)
        self.sampler = EpochBatches(self.size, cfg.optim.batch_size, rank, world, cfg.runtime.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0, indices: bool = False):
        self.sampler.set_epoch(epoch, start_step)
        batches = list(self.sampler)  # a new DataLoader an epoch: the classic design, kept as it was
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.cfg.data.num_workers else None)
        for (x_q, x_k), keys in zip(loader, batches):
            views = x_q.to(self.device, non_blocking=True), x_k.to(self.device, non_blocking=True)
            yield (*views, torch.tensor([i for _, i in keys], device=self.device)) if indices else views

    def _items(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of `keys` made here, in this process (no DataLoader): each item's own seed."""
        x_q, x_k = zip(*(self.dataset[key] for key in keys))
        return torch.stack(x_q).to(self.device), torch.stack(x_k).to(self.device)

    def batch_at(self, epoch: int, step: int) -> tuple[torch.Tensor, ...]:
        """(view 1, view 2, indices) of this rank at (epoch, step), exactly as training saw them."""
        keys = self.sampler.keys(epoch, step)
        return (*self._items(keys), torch.tensor([i for _, i in keys], device=self.device))

    def pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of a fixed seeded subset of n training images (the diagnostics' own seed key)."""
        seed = self.cfg.runtime.seed
        idx = torch.randperm(len(self.dataset), generator=seeded_generator("diagnostics", seed))[:n].tolist()
        return self._items([(("diagnostics", seed), i) for i in idx])


def pretrain_views(cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1, splits=None):
    """The pretraining batches. `splits` given for an image-folder recipe: images in memory (the
    benchmarks' synthetic data), through the same augmentation paths."""
    if cfg.data.dataset == "imagefolder" and splits is None:
        if cfg.data.loader == "per_image":
            return LoaderViews(cfg, device, rank, world)
        from harness.data.folder_views import FolderViews

        return FolderViews(cfg, device, rank, world)
    splits = splits or load_tensors(cfg)
    if cfg.data.loader == "per_image":
        return LoaderViews(cfg, device, rank, world, images=splits.pretrain)
    return InMemoryViews(splits.pretrain, cfg, device, rank, world)


# ---------------------------------------------------------------- evaluation views

def labelled_batches(images: torch.Tensor, labels: torch.Tensor, cfg: RunConfig, device,
                     batch_size: int | None = None):
    """Un-augmented, normalised (image, label) batches of an in-memory split."""
    batch_size = batch_size or (512 if device.type == "cuda" else 128)  # CPU: smaller stays in cache (1.5x)
    mean, std = NORMALIZATION[cfg.data.dataset]
    for lo in range(0, len(images), batch_size):
        x = center_view(images[lo:lo + batch_size].to(device), cfg.data.image_size, mean, std)
        yield x, labels[lo:lo + batch_size].to(device)


def eval_subset(n: int, limit: int | None, split: str) -> torch.Tensor | None:
    """The evaluation subset of a split: `limit` of its `n` images by a fixed seeded permutation (the
    same for every run, so kNN values compare across runs); None: all of them."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=seeded_generator("eval", split))[:limit]


def folder_eval_loader(cfg: RunConfig, split: str, device, batch_size: int = 256, limit: int | None = None,
                       share: Callable[[int], slice] = lambda n: slice(0, n)):
    """Evaluation views (resize, centre crop) of an image folder's split: its seeded subset of `limit`
    images, and of those the rows `share(len(subset))` (a rank's chunk, harness.model.distributed.chunk_of)."""
    from harness.data.folder_views import EvalDecode, image_folder

    mean, std = NORMALIZATION["imagefolder"]
    size, resize = cfg.data.image_size, int(cfg.data.image_size * 256 / 224)
    # the pretraining views' decode, reduced where the shorter side stays >= the resize
    folder = image_folder(cfg, split, eval_transform(size, mean, std, resize=resize), loader=EvalDecode(resize))
    pick = eval_subset(len(folder), limit, "train" if split == "train" else "test")
    indices = list(range(len(folder))) if pick is None else pick.tolist()
    chunk = indices[share(len(indices))]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(folder, chunk), batch_size=batch_size,
                                       num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")


def folder_probe_set(cfg: RunConfig, spec):
    """main_lincls's training views of an image folder: per-image crop + flip (in loader workers)."""
    from harness.data.folder_views import decode_full, image_folder

    mean, std = NORMALIZATION["imagefolder"]
    return image_folder(cfg, "train", per_image_transform(spec, cfg.data.image_size, mean, std), loader=decode_full)


def folder_probe_loader(cfg: RunConfig, folder, device, epoch: int, batch_size: int):
    """One epoch of `folder`, shuffled by (seed, epoch) so that a probe is reproducible."""
    return torch.utils.data.DataLoader(folder, batch_size=batch_size, shuffle=True, drop_last=True,
                                       generator=seeded_generator("probe", cfg.runtime.seed, epoch),
                                       num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")


def folder_classes(cfg: RunConfig) -> int:
    from harness.data.folder_views import folder_index

    return len(folder_index(str(folder_root(cfg.data.root) / "train"))[0])
