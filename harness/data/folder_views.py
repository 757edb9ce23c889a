"""Image-folder pretraining views, with the work split where it belongs.

The classic loader (the official MoCo's, and `data.loader=per_image` here) makes each view in a
DataLoader worker: decode, crop, flip, colour jitter, grayscale, a 23x23 blur and normalisation, all
per image on the CPU, handed over as float32. One CPU core then makes ~70 v2 pairs a second, far
below what one GPU trains. Here (`data.loader=batched`, the default):

* loader workers do only what needs the file (`CropFlipPairs`): decode once per image (PIL, i.e.
  libjpeg-turbo; a reduced DCT decode when both crops are at least twice the output size), the two
  RandomResizedCrops resized to the recipe's size, the flips, and hand over **uint8** (4x less to
  pin and copy than float32);
* colour jitter, grayscale, blur and normalisation run batched on the training device
  (`BatchAugment.draw_colour` and `apply_colour`, the in-memory path's code: same distributions,
  explicit generators; both views' parameters in one copy);
* the DataLoader and its workers persist across epochs (`EpochBatches` is told the epoch).

With `data.loader=device_decode` the workers only read the files' bytes and draw the crops; the
decode (nvjpeg through `torchvision.io.decode_jpeg` on CUDA), crops and resizes run on the device.

Every random choice derives from (seed, epoch, step, rank, image index), never from a worker's
state, so any number of workers and a run resumed mid-epoch see exactly the same views.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from pathlib import Path

import torch

from harness.data.augment import AugmentSpec, BatchAugment, sample_crops, to_device
from harness.data.spec import NORMALIZATION, EpochBatches, Key, seeded_generator, view_spec
from harness.run.config import RunConfig
from harness.run.datafiles import folder_root
from harness.run.errors import ConfigError

# ---------------------------------------------------------------- decoding (workers and evaluation)

def decode_rgb(image, at_least: tuple[float, float] | None = None):
    """An opened image file (`PIL.Image.open`: header read, pixels not yet) as an RGB PIL image, and
    the factors (x, y) its decoded size is of the file's.

    `at_least` (width, height): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, much cheaper than decoding in full and resizing) as long as it stays that large."""
    width, height = image.size
    if at_least is not None and image.format == "JPEG":
        image.draft("RGB", (math.ceil(at_least[0]), math.ceil(at_least[1])))
    image = image.convert("RGB")
    return image, (image.size[0] / width, image.size[1] / height)


class EvalDecode:
    """ImageFolder `loader` for evaluation views (resize the shorter side to `shorter`, centre crop):
    a reduced decode where the shorter side stays at least `shorter` (picklable, for workers)."""

    def __init__(self, shorter: int):
        self.shorter = shorter

    def __call__(self, path: str):
        from PIL import Image

        image = Image.open(path)
        width, height = image.size
        scale = self.shorter / min(width, height)
        return decode_rgb(image, (width * scale, height * scale) if scale < 1 else None)[0]


def decode_full(path: str):
    """ImageFolder `loader` for views whose crop is drawn after loading (the probe's): a full decode."""
    from PIL import Image

    return decode_rgb(Image.open(path))[0]


# ---------------------------------------------------------------- the worker side

def draw_crops(key: Key, width: int, height: int, spec: AugmentSpec):
    """Both views' RandomResizedCrop boxes (top, left, h, w) and flips of image `key`, from the
    image's own generator (torchvision's distributions; see augment.sample_crops)."""
    seed_key, index = key
    g = seeded_generator("item", *seed_key, index)
    top, left, h, w = sample_crops(2, height, width, spec, g)
    flip = torch.rand(2, generator=g) < spec.flip_p
    return torch.stack([top, left, h, w], 1), flip


class CropFlipPairs(torch.utils.data.Dataset):
    """Key (seed key, index) -> (view 1, view 2, index): uint8 HWC crops of side `size`, flipped.

    `samples`: ImageFolder's (path, class) list. With `encoded`, a worker returns the file's bytes
    and the drawn boxes instead (the device decodes, see `decode_on_device`)."""

    def __init__(self, samples: list, spec: AugmentSpec, size: int, encoded: bool = False):
        self.samples, self.spec, self.size, self.encoded = samples, spec, size, encoded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key):
        from PIL import Image

        path = self.samples[key[1]][0]
        image = Image.open(path)  # the header: the size the crops are drawn in
        width, height = image.size
        boxes, flip = draw_crops(key, width, height, self.spec)
        if self.encoded:
            image.close()
            data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            return data, boxes, flip, key[1]
        # Decode once for both views, as small as the smaller crop allows (each side >= the output's).
        smallest_h, smallest_w = boxes[:, 2].min().item(), boxes[:, 3].min().item()
        at_least = (width * self.size / smallest_w, height * self.size / smallest_h)
        image, (sx, sy) = decode_rgb(image, at_least if at_least[0] < width and at_least[1] < height else None)
        views = []
        for (top, left, h, w), flipped in zip(boxes.tolist(), flip.tolist()):
            # crop and resize in one PIL pass (bilinear, antialiased: torchvision's RandomResizedCrop on PIL)
            view = image.resize((self.size, self.size), Image.BILINEAR,
                                box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
            if flipped:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            views.append(torch.frombuffer(bytearray(view.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3))
        return views[0], views[1], key[1]


def collate_encoded(items):
    """Batch of `encoded` items: byte strings differ in length, so they stay a list."""
    data, boxes, flips, index = zip(*items)
    return list(data), torch.stack(boxes), torch.stack(flips), torch.tensor(index)


# SOF markers (baseline, progressive, lossless, arithmetic): their segment says how many components.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_components(data: torch.Tensor) -> int | None:
    """The number of colour components a JPEG's header declares (1 gray, 3 YCbCr, 4 CMYK/YCCK), or None
    when the bytes are not a JPEG whose frame header could be found (read from the header only)."""
    raw = data[:65536].numpy().tobytes() if len(data) > 4 else b""  # the file's bytes (a CPU uint8 tensor)
    if raw[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(raw):
        if raw[at] != 0xFF:
            return None
        marker, length = raw[at + 1], int.from_bytes(raw[at + 2:at + 4], "big")
        if marker in _SOF:
            return raw[at + 9] if at + 9 < len(raw) else None
        at += 2 + length
    return None


def _decode_on_cpu(data: torch.Tensor, shape: tuple[int, int]):
    """One image decoded by PIL (what nvjpeg cannot: CMYK, damaged files), CHW uint8 RGB; an image
    PIL cannot read either becomes mid-gray of `shape` (height, width), so an epoch never stops on
    one file. Returns (image, whether it was readable)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            rgb = image.convert("RGB")
            return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.size[1], rgb.size[0], 3).permute(2, 0, 1), True
    except (OSError, ValueError, SyntaxError):
        height, width = shape
        return torch.full((3, height, width), 128, dtype=torch.uint8), False


def decode_on_device(data: list, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                     device: torch.device, fallbacks: Counter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views (float in [0, 1], NCHW) of encoded images, decoded on `device` (nvjpeg on CUDA;
    libjpeg-turbo on the CPU), cropped and resized there (`_crop_resize`).

    On CUDA the decode runs under a stream of its own that the step's stream then waits for:
    torchvision's decoder allocates its outputs on the stream current at the call and writes them
    from a private one that does not wait for it (pytorch/vision#9606), so on the step's stream it
    could be handed memory that kernels still queued there read. Blocks of the decode stream are
    reused only after the step's stream is done with them (`record_stream`).

    What the batched decode cannot take goes image by image to the CPU, counted in `fallbacks`:
    CMYK/YCCK JPEGs (4 components, read from the header; nvjpeg refuses them: `cmyk`), every image of
    a batch whose batched decode failed (`batch_failed`, then each on its own), and files no decoder
    reads (`unreadable`: mid-gray, as large as its crop boxes reach)."""
    fallbacks = fallbacks if fallbacks is not None else Counter()
    with _decode_stream(device) as on_step_stream:
        decoded = [on_step_stream(image) for image in _decode_all(data, boxes, device, fallbacks)]
    return _crop_resize(decoded, boxes, flips, size)


def _decode_all(data: list, boxes: torch.Tensor, device: torch.device, fallbacks: Counter) -> list:
    """Every image of the batch decoded (CHW uint8 RGB on `device`): the JPEGs nvjpeg takes in one
    batched call, the rest one by one (see decode_on_device)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    from harness.run import faults

    reach = (boxes[..., 0] + boxes[..., 2]).amax(1).tolist(), (boxes[..., 1] + boxes[..., 3]).amax(1).tolist()
    components = [jpeg_components(d) for d in data]
    jpegs = [i for i, c in enumerate(components) if c in (1, 3)]
    decoded: list = [None] * len(data)
    if jpegs:
        try:
            faults.raise_once("decode-batch")
            # one batched call: nvjpeg decodes the whole list at once on CUDA
            for i, image in zip(jpegs, decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)):
                decoded[i] = image
        except RuntimeError:
            fallbacks["batch_failed"] += 1
            for i in jpegs:
                try:
                    decoded[i] = decode_jpeg(data[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    decoded[i] = None
    for i in range(len(data)):
        if decoded[i] is not None:
            continue
        if components[i] == 4:
            fallbacks["cmyk"] += 1
        elif components[i] is None:  # PNG and other formats: the CPU decodes them (not a fallback)
            try:
                decoded[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(device)
                continue
            except RuntimeError:
                pass
        image, readable = _decode_on_cpu(data[i], (int(reach[0][i]), int(reach[1][i])))
        if not readable:
            fallbacks["unreadable"] += 1
        decoded[i] = image.to(device)
    return decoded


@contextlib.contextmanager
def _decode_stream(device: torch.device):
    """On CUDA: the body runs on a side stream that first waits for the step's stream; yields a
    function that hands a tensor made there to the step's stream. Elsewhere: nothing to order."""
    if device.type != "cuda":
        yield lambda tensor: tensor
        return
    step_stream = torch.cuda.current_stream(device)
    side = _decode_side_stream(device)
    side.wait_stream(step_stream)

    def on_step_stream(tensor: torch.Tensor) -> torch.Tensor:
        tensor.record_stream(step_stream)  # its block is not reused before the step's stream is done with it
        return tensor

    with torch.cuda.stream(side):
        yield on_step_stream
    step_stream.wait_stream(side)


@functools.cache
def _decode_side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)  # one per device for the run, not one per batch


def _crop_resize(decoded: list, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views' crops of every image resized to size x size: one `roi_align` per image for its two
    boxes (bilinear samples averaged over each output pixel's area, as many as the scale needs: an
    antialiased resize), flips applied to the whole batch at once. Two launches an image instead of
    a slice, a conversion, a resize and a flip per image and view."""
    from torchvision.ops import roi_align

    device = decoded[0].device
    # boxes (n, 2, 4) as (top, left, h, w) -> roi_align's rows (0, x1, y1, x2, y2), pixel edges, each
    # image its own batch of one; one copy to the device for all of them
    top, left, h, w = boxes.to(torch.float32).unbind(-1)
    rois = to_device(torch.stack([torch.zeros_like(top), left, top, left + w, top + h], -1), device)  # (n, 2, 5)
    flipped = to_device(flips.t().reshape(2, -1, 1, 1, 1), device)
    views = torch.stack([roi_align(image[None].float(), rois[i], output_size=size, spatial_scale=1.0,
                                   sampling_ratio=0, aligned=True)
                         for i, image in enumerate(decoded)], 1)  # (2, n, C, size, size)
    views = torch.where(flipped, views.flip(-1), views).clamp_(0, 255).div_(255)
    return views[0], views[1]


# ---------------------------------------------------------------- the main-process side

class FolderViews:
    """Pretraining batches of an image folder: crops in loader workers (uint8), colours on the device."""

    def __init__(self, cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1,
                 samples: list | None = None):
        if samples is None:
            samples = image_folder(cfg, "train").samples
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        spec, size = view_spec(cfg), cfg.data.image_size
        self.encoded = cfg.data.loader == "device_decode"
        self.decode_fallbacks: Counter = Counter()  # device_decode: images the batched decode could not take
        self._warned_epoch = None
        self.dataset = CropFlipPairs(samples, spec, size, encoded=self.encoded)
        self.augment = BatchAugment(spec, size, *NORMALIZATION["imagefolder"])
        self.size = len(samples)  # training images (the memory bank's entries)
        self.sampler = EpochBatches(self.size, cfg.optim.batch_size, rank, world, cfg.runtime.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} is larger than the {self.size} "
                              f"training images of {cfg.data.root}; lower it or add images.")
        self._loader: torch.utils.data.DataLoader | None = None

    def loader(self) -> torch.utils.data.DataLoader:
        """One DataLoader for the whole run: its workers start once, not every epoch."""
        if self._loader is None:
            workers = self.cfg.data.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self.sampler, num_workers=workers,
                collate_fn=collate_encoded if self.encoded else None,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers else None)
        return self._loader

    def epoch(self, epoch: int, start_step: int = 0, indices: bool = False):
        self.sampler.set_epoch(epoch, start_step)
        for step, batch in enumerate(self.loader(), start=start_step):
            views = self.finish(batch, epoch, step)
            yield views if indices else views[:2]

    def finish(self, batch, epoch: int, step: int) -> tuple[torch.Tensor, ...]:
        """Worker output -> normalised float views on the device: the batched colour augmentation,
        from the step's generator (both views, in turn)."""
        if self.encoded:
            data, boxes, flips, index = batch
            before = sum(self.decode_fallbacks.values())
            x_q, x_k = decode_on_device(data, boxes, flips, self.cfg.data.image_size, self.device, self.decode_fallbacks)
            if sum(self.decode_fallbacks.values()) > before and self._warned_epoch != epoch:  # once an epoch
                self._warned_epoch = epoch
                print(f"[data] decoded on the CPU instead (so far): {dict(self.decode_fallbacks)} (harness.data."
                      "folder_views.decode_on_device)", flush=True)
        else:
            u_q, u_k, index = batch
            x_q, x_k = (u.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255).contiguous()
                        for u in (u_q, u_k))
        g = seeded_generator("augment", self.cfg.runtime.seed, epoch, step, self.rank)
        n, c = x_q.shape[:2]
        tables = to_device(torch.stack([self.augment.draw_colour(n, c, g) for _ in range(2)]), self.device)
        return (self.augment.apply_colour(x_q, tables[0]), self.augment.apply_colour(x_k, tables[1]),
                to_device(index, self.device))

    def _items(self, keys: list[Key], epoch, step) -> tuple[torch.Tensor, ...]:
        """The views of `keys` made here, in this process (no DataLoader), as a worker makes them."""
        items = [self.dataset[key] for key in keys]
        batch = collate_encoded(items) if self.encoded else torch.utils.data.default_collate(items)
        return self.finish(batch, epoch, step)

    def batch_at(self, epoch: int, step: int) -> tuple[torch.Tensor, ...]:
        """(view 1, view 2, indices) of this rank at (epoch, step), exactly as training saw them."""
        return self._items(self.sampler.keys(epoch, step), epoch, step)

    def pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of a fixed seeded subset of n training images (the diagnostics' own seed key)."""
        seed = self.cfg.runtime.seed
        idx = torch.randperm(self.size, generator=seeded_generator("diagnostics", seed))[:n].tolist()
        return self._items([(("diagnostics", seed), i) for i in idx], "diagnostics", seed)[:2]


# ---------------------------------------------------------------- the folder's index

@functools.lru_cache(maxsize=8)
def folder_index(directory: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """An image folder split's classes and (path, class) list: ImageFolder's directory walk, once per
    process (ImageNet's train/ is 1.28M files, and a run reads it for pretraining, every kNN
    evaluation on every rank, and the probe)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(directory)
    return tuple(classes), tuple(make_dataset(directory, class_to_idx, IMG_EXTENSIONS))


class IndexedFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder over an index read once per process (folder_index): the same
    classes, samples, targets and items, (transform(loader(path)), class)."""

    def __init__(self, directory: str, transform=None, loader=None):
        classes, self.samples = folder_index(directory)
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.targets = [target for _, target in self.samples]
        self.transform, self.loader = transform, loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        if self.loader is None:
            from torchvision.datasets.folder import default_loader

            self.loader = default_loader
        image = self.loader(path)
        return (self.transform(image) if self.transform is not None else image), target


def image_folder(cfg: RunConfig, split: str, transform=None, loader=None) -> IndexedFolder:
    return IndexedFolder(str(folder_root(cfg.data.root) / split), transform, loader)
