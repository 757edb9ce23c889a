"""MoCo augmentation recipes, in two implementations built from one spec.

* `BatchAugment`: a whole uint8 batch on the training device, augmented at once with an explicit
  random generator (no PIL, no worker processes). Used for datasets held in memory.
* `per_image_transform`: the same recipe as torchvision transforms v2, for DataLoader paths
  (image folders) and as the reference the batched path is tested against.

Recipes (moco.md): v1 = RRC(0.2-1) + ColorJitter(0.4,0.4,0.4,0.4) + Grayscale 0.2 + flip;
v2 (aug+) = RRC(0.2-1) + ColorJitter(0.4,0.4,0.4,0.1) p0.8 + Grayscale 0.2 + blur p0.5 + flip;
cifar = v2 without blur (the CIFAR-10 Colab).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5


RECIPES = {
    "v1": AugmentSpec(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0),
    "v2": AugmentSpec(blur_p=0.5),
    "cifar": AugmentSpec(),
    # Linear-probe training augmentation (main_lincls): crop + flip only.
    "probe": AugmentSpec(crop_scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0),
}


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel of about 10% of the image side (23 at 224, as in common v2 ports)."""
    return max(3, 2 * round(0.05 * image_size) + 1)


# ---------------------------------------------------------------- batched, on-device

def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


def sample_crops(n: int, height: int, width: int, spec: AugmentSpec, g: torch.Generator, tries: int = 10):
    """RandomResizedCrop boxes exactly as torchvision draws them: up to 10 tries, then a centre crop.

    Returns (top, left, h, w) integer tensors of length n.
    """
    area = height * width
    scale = torch.rand(n, tries, generator=g) * (spec.crop_scale[1] - spec.crop_scale[0]) + spec.crop_scale[0]
    log_lo, log_hi = math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])
    ratio = torch.exp(torch.rand(n, tries, generator=g) * (log_hi - log_lo) + log_lo)
    w = torch.round(torch.sqrt(area * scale * ratio)).long()
    h = torch.round(torch.sqrt(area * scale / ratio)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.float().argmax(dim=1)  # first valid try per image
    any_valid = valid.any(dim=1)
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    # Fallback: the largest centred crop with an allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < spec.crop_ratio[0]:
        fw, fh = width, int(round(width / spec.crop_ratio[0]))
    elif in_ratio > spec.crop_ratio[1]:
        fh, fw = height, int(round(height * spec.crop_ratio[1]))
    else:
        fw, fh = width, height
    w = torch.where(any_valid, w, torch.full_like(w, fw))
    h = torch.where(any_valid, h, torch.full_like(h, fh))
    u_top, u_left = torch.rand(n, generator=g), torch.rand(n, generator=g)
    top = torch.where(any_valid, (u_top * (height - h + 1)).long().clamp(max=height - h), (height - h) // 2)
    left = torch.where(any_valid, (u_left * (width - w + 1)).long().clamp(max=width - w), (width - w) // 2)
    return top, left, h, w


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.split(1, 1)
    return 0.2989 * r + 0.587 * g + 0.114 * b  # the ITU-R 601 weights torchvision uses


def _blend_parts(x: torch.Tensor, factor: torch.Tensor, to_gray: torch.Tensor | None,
                 to_mean: torch.Tensor | None) -> torch.Tensor:
    """Brightness, contrast or saturation of each image in one expression: torchvision blends the
    image with black, its gray level's mean or its gray image, clamp(f x + (1 - f) target). The table
    gives f and (1 - f) already split by target (`to_gray`, `to_mean`: 1 - f for the image's part,
    0 for the others), so every image gets its own part and factor 1 leaves it exactly as it was."""
    y = factor * x
    if to_gray is not None or to_mean is not None:
        gray = _grayscale(x)
        if to_gray is not None:
            y = y + to_gray * gray
        if to_mean is not None:
            y = y + to_mean * gray.mean(dim=(1, 2, 3), keepdim=True)
    return y.clamp(0, 1)


def _adjust_hue(x: torch.Tensor, shift6: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by `shift6` (shape (N, 1, 1, 1), in sixths of a turn), as torchvision's
    adjust_hue (RGB -> HSV, h + shift, HSV -> RGB) but without building S and V: with v = max and
    v s = max - min, channel n of the result is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h') mod 6,
    n = 5, 3, 1. Hue in sixths: (g - b, b - r, r - g) / (max - min) + (0, 2, 4) at the channel that
    holds the maximum (the first one on ties, as torchvision); 0 for a gray pixel."""
    maxc, argmax = x.max(1, keepdim=True)
    delta = maxc - x.amin(1, keepdim=True)
    diffs = x.roll(-1, 1) - x.roll(-2, 1)  # (g - b, b - r, r - g)
    offsets, phases, one, zero = _hue_constants(x.device, x.dtype)
    chromatic = delta > 0
    sixths = diffs / torch.where(chromatic, delta, one) + offsets
    h6 = torch.where(chromatic, sixths.gather(1, argmax), zero) + shift6
    k = (h6 + phases) % 6.0  # n = 5, 3, 1
    return maxc - delta * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


@functools.cache
def _hue_constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The hue offsets (0, 2, 4), the phases 5 - offsets, 1 and 0: made on the device once, not per
    call (a host tensor would be a copy per call, a Python scalar in `where` a tensor per call)."""
    offsets = torch.arange(0.0, 6.0, 2.0, device=device, dtype=dtype).view(1, 3, 1, 1)
    return (offsets, 5.0 - offsets, torch.ones((), device=device, dtype=dtype),
            torch.zeros((), device=device, dtype=dtype))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Separable blur with one sigma per image (grouped convolution, reflect padding)."""
    n, c, h, w = x.shape
    half = ksize // 2
    coords = torch.arange(ksize, device=x.device, dtype=x.dtype) - half
    kernel = torch.exp(-(coords[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (n, k)
    kernel = kernel.repeat_interleave(c, 0)  # (n*c, k)
    flat = x.reshape(1, n * c, h, w)
    pad = min(half, h - 1, w - 1)
    if pad < half:  # image smaller than the kernel: crop the kernel to what reflect padding allows
        kernel = kernel[:, half - pad: half + pad + 1]
        kernel = kernel / kernel.sum(1, keepdim=True)
    flat = F.pad(flat, (pad, pad, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.pad(flat, (0, 0, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


class BatchAugment:
    """Augment a uint8 batch (N, C, H, W) into normalised float views of side `size`.

    Two phases, so that a GPU never waits for the host inside a step:
      draw   every random parameter of a view, on the CPU, from the generator given (a step's
             views depend only on that generator's seed, on any device), as one (N, columns) table;
      apply  the table, moved to the device in one non-blocking copy, applied to every image at
             once: an operation an image does not get is the identity for it (factor 1, or a
             `where` that keeps the input), so no shape depends on the draws and nothing is read
             back from the device.
    """

    # Columns of the colour table: per jitter stage (4, in each image's own random order) the factor
    # f of its brightness, contrast or saturation part (1 for none), 1 - f toward the gray image
    # (saturation) and toward the gray mean (contrast), 0 otherwise; hue on (0/1), hue shift in
    # sixths of a turn; then grayscale on, blur on, sigma.
    STAGE = 5
    GRAY, BLUR, SIGMA = 4 * STAGE, 4 * STAGE + 1, 4 * STAGE + 2
    COLOUR_COLUMNS = 4 * STAGE + 3

    def __init__(self, spec: AugmentSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.spec, self.size = spec, size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One view of each image (crop, flip, colours), drawn from `g` and applied where `images` live."""
        return self.apply(images, to_device(self.draw(images.shape, g), images.device))

    def draw(self, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
        """The table of one view of a batch of `shape` (N, C, H, W): draw_crop_flip | draw_colour."""
        n, c, height, width = shape
        return torch.cat([self.draw_crop_flip(n, height, width, g), self.draw_colour(n, c, g)], 1)

    def apply(self, images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`images` (uint8) cropped, flipped and coloured by a table of draw_crop_flip | draw_colour rows."""
        x = self.apply_crop_flip(images.float().div_(255), table[:, :6])
        return self.apply_colour(x, table[:, 6:])

    # ------------------------------------------------------------ draws (CPU)

    def draw_crop_flip(self, n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop and flip of n images as (n, 6) affine rows (grid_sample's theta)."""
        top, left, h, w = sample_crops(n, height, width, self.spec, g)
        flip = torch.rand(n, generator=g) < self.spec.flip_p
        zero = torch.zeros(n)
        return torch.stack([(w / width) * (1.0 - 2.0 * flip), zero, (2 * left + w) / width - 1,
                            zero, h / height, (2 * top + h) / height - 1], 1)

    def draw_colour(self, n: int, channels: int, g: torch.Generator) -> torch.Tensor:
        """Colour jitter (with probability jitter_p, its four parts in a random order per image),
        grayscale and blur of n images: the (n, COLOUR_COLUMNS) table. Few ops: it is host work
        done every step."""
        spec = self.spec
        if spec.jitter_p > 0 and any(spec.jitter):
            b, ct, s, hue = spec.jitter
            jitter = torch.rand(n, generator=g) < spec.jitter_p
            factors = torch.stack([_uniform(n, max(0.0, 1 - v), 1 + v, g) for v in (b, ct, s)]
                                  + [_uniform(n, -hue, hue, g)], 1)  # (n, 4)
            order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)  # order[:, stage] = the part done then
            parts = 4 if channels == 3 else 2  # saturation and hue leave a one-channel image as it is
            at = (order.unsqueeze(2) == torch.arange(parts)) & jitter.view(n, 1, 1)  # (n, stage, part)
            # at most one part per stage: the product is that part's factor, or 1
            factor = torch.where(at[..., :3], factors[:, None, :min(parts, 3)], 1.0).prod(2)
            rest = 1 - factor
            no_hue = torch.zeros(n, 4)
            stages = torch.stack([factor, rest * at[..., 2] if parts == 4 else no_hue, rest * at[..., 1],
                                  at[..., 3].float() if parts == 4 else no_hue,
                                  (6.0 * factors[:, 3:4]).expand(n, 4)], 2)
        else:
            stages = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]).expand(n, 4, self.STAGE)  # the identity
        no = torch.zeros(n)
        gray = (torch.rand(n, generator=g) < spec.grayscale_p).float() if spec.grayscale_p > 0 and channels == 3 else no
        blur = (torch.rand(n, generator=g) < spec.blur_p).float() if spec.blur_p > 0 else no
        sigma = _uniform(n, *spec.blur_sigma, g) if spec.blur_p > 0 else no
        return torch.cat([stages.reshape(n, -1), torch.stack([gray, blur, sigma], 1)], 1)

    # ------------------------------------------------------------ application (the device)

    def apply_crop_flip(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Random resized crop + horizontal flip of a float batch in [0, 1], as one affine resampling."""
        n, c = x.shape[:2]
        grid = F.affine_grid(theta.reshape(n, 2, 3), [n, c, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def apply_colour(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Colour jitter, grayscale, blur and normalisation of a float batch in [0, 1] (already cropped
        to `size`): the part of the recipe that needs no file, batched wherever `x` lives. Factor 1
        leaves an image exactly as it was (1 * v + 0 * u = v, and v is in [0, 1] for the clamp)."""
        spec, c = self.spec, x.shape[1]
        columns = table.view(table.shape[0], -1, 1, 1)
        column = lambda i: columns[:, i:i + 1]  # noqa: E731  (a per-image factor, (N, 1, 1, 1))
        if spec.jitter_p > 0 and any(spec.jitter):
            b, ct, s, hue = spec.jitter
            for stage in range(4):
                col = stage * self.STAGE
                if b or ct or (s and c == 3):
                    x = _blend_parts(x, column(col), column(col + 1) if s and c == 3 else None,
                                     column(col + 2) if ct else None)
                if hue and c == 3:
                    x = torch.where(column(col + 3) > 0, _adjust_hue(x, column(col + 4)), x)
        if spec.grayscale_p > 0 and c == 3:
            x = torch.where(column(self.GRAY) > 0, _grayscale(x).expand_as(x), x)
        if spec.blur_p > 0:
            blurred = _gaussian_blur(x, table[:, self.SIGMA], blur_kernel_size(self.size))
            x = torch.where(column(self.BLUR) > 0, blurred, x)
        mean, std = self._constants(x.device)
        return (x - mean) / std

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:  # copied once per device, not once per step
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A step's CPU-made tensor on the training device in one copy that does not block the host
    (pinned first on CUDA, where a copy from pageable memory would synchronise)."""
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)  # on the CPU: the same tensor


def center_view(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Evaluation view of a uint8 batch: resize (if needed) and normalise, no randomness."""
    x = images.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    dev = x.device
    return (x - torch.tensor(mean, device=dev).view(1, -1, 1, 1)) / torch.tensor(std, device=dev).view(1, -1, 1, 1)


# ---------------------------------------------------------------- per-image, torchvision v2

def per_image_transform(spec: AugmentSpec, size: int, mean, std):
    """The same recipe as torchvision transforms v2 (uint8 CHW tensor or PIL image in, float out)."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RandomResizedCrop(size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True)]
    if spec.jitter_p > 0 and any(spec.jitter):
        steps.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(p=spec.grayscale_p))
    if spec.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(size), sigma=spec.blur_sigma)
        steps.append(v2.RandomApply([blur], p=spec.blur_p))
    steps += [v2.RandomHorizontalFlip(spec.flip_p), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(size: int, mean, std, resize: int | None = None):
    from torchvision.transforms import v2

    resize = resize or size
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
