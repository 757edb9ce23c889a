"""Dataset files: gzipped IDX files are decompressed once into the cache, a changed file is read anew,
and a run holds its images in memory, whatever becomes of the file."""
import gzip
import os

import torch

from harness.data import datasets as data


def _idx_gz(path, images: torch.Tensor) -> None:
    n, h, w = images.shape
    header = b"".join(v.to_bytes(4, "big") for v in (2051, n, h, w))
    with gzip.open(path, "wb") as fh:
        fh.write(header + images.numpy().tobytes())


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_a_gzipped_idx_file_is_decompressed_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "images-idx3-ubyte.gz"
    first = _images(5, 0)
    _idx_gz(path, first)
    assert torch.equal(data._read_idx(path), first.unsqueeze(1))
    (cached,) = (tmp_path / "cache" / "idx").iterdir()
    assert cached.read_bytes() == gzip.decompress(path.read_bytes())

    stat = path.stat()  # unreadable now, same size and time: the next read must come from the cache
    path.write_bytes(b"\0" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert torch.equal(data._read_idx(path), first.unsqueeze(1))

    second = _images(6, 1)  # a new file (another size): decompressed again, not the stale copy
    _idx_gz(path, second)
    assert torch.equal(data._read_idx(path), second.unsqueeze(1))


def _idx(path, values: torch.Tensor) -> None:
    """An uncompressed IDX file: images (N, H, W) or labels (N,)."""
    dims = values.shape
    header = b"".join(v.to_bytes(4, "big") for v in (2051 if len(dims) == 3 else 2049, *dims))
    path.write_bytes(header + values.numpy().tobytes())


def test_a_run_holds_its_images_in_memory_never_a_map_of_the_file(tmp_path):
    """Images are read through a memory map (a subset reads only its pages), but what load_tensors
    returns is a copy: a dataset file rewritten in place under a running trial changes nothing."""
    from harness.run.config import make_config

    images = {"train": _images(40, 2), "t10k": _images(20, 3)}
    for split, x in images.items():
        _idx(tmp_path / f"{split}-images-idx3-ubyte", x)
        _idx(tmp_path / f"{split}-labels-idx1-ubyte", torch.arange(len(x), dtype=torch.uint8) % 10)
    cfg = lambda *extra: make_config("fmnist-tiny", [f"data.root={tmp_path}", *extra])  # noqa: E731
    whole = data.load_tensors(cfg("data.train_subset=null", "data.test_subset=null"))
    part = data.load_tensors(cfg("data.train_subset=8", "data.test_subset=4"))
    assert torch.equal(whole.train_images, images["train"].unsqueeze(1)) and whole.pretrain is whole.train_images
    assert torch.equal(whole.test_labels, torch.arange(20) % 10)
    idx = data._subset(40, 8, "fashion_mnist/train")
    assert torch.equal(part.train_images, images["train"][idx].unsqueeze(1)) and len(part.test_images) == 4
    for split in images:  # rewritten in place, as an editor or a failed copy would
        path = tmp_path / f"{split}-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:16] + b"\0" * (path.stat().st_size - 16))
    assert torch.equal(whole.train_images, images["train"].unsqueeze(1))
    assert torch.equal(whole.test_images, images["t10k"].unsqueeze(1))
    assert torch.equal(part.train_images, images["train"][idx].unsqueeze(1))
