"""Dataset files: gzipped IDX files are decompressed once into the cache, and a changed file is read anew."""
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
