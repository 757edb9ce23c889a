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
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.2989 * r + 0.587 * g + 0.114 * b  # the ITU-R 601 weights torchvision uses


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / maxc.clamp(min=1e-8)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Closed form: channel(n) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1."""
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by `shift` (shape (N, 1, 1, 1), in turns)."""
    hsv = _rgb_to_hsv(x)
    hsv = torch.cat([((hsv[:, :1] + shift) % 1.0), hsv[:, 1:]], 1)
    return _hsv_to_rgb(hsv)


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

    All random parameters are drawn on the CPU from the generator given to each call, so a
    step's views depend only on that generator's seed, on any device.
    """

    def __init__(self, spec: AugmentSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.spec, self.size = spec, size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.colour(self.crop_flip(images.float().div_(255), g), g)

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random resized crop + horizontal flip of a float batch in [0, 1], as one affine resampling."""
        spec, n, dev = self.spec, x.shape[0], x.device
        _, c, height, width = x.shape
        top, left, h, w = sample_crops(n, height, width, spec, g)
        flip = torch.rand(n, generator=g) < spec.flip_p
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = (w / width) * torch.where(flip, -1.0, 1.0)
        theta[:, 1, 1] = h / height
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 2] = (2 * top + h) / height - 1
        grid = F.affine_grid(theta.to(dev), [n, c, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def colour(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Colour jitter, grayscale, blur and normalisation of a float batch in [0, 1] (already cropped
        to `size`): the part of the recipe that needs no file, batched wherever `x` lives.

        Each operation runs only on the images it applies to (chosen on the CPU, where the parameters
        are drawn, so no device sync): hue, the costliest, once per image instead of four times."""
        spec, n, dev, c = self.spec, x.shape[0], x.device, x.shape[1]
        x = x.clone()

        def apply(rows: torch.Tensor, op) -> None:  # x[rows] = op(x[rows], rows), rows on the CPU
            if len(rows):
                idx = rows.to(dev)
                x[idx] = op(x.index_select(0, idx), rows)

        def per_image(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return values[rows].view(-1, 1, 1, 1).to(dev)

        # Colour jitter, applied with probability jitter_p, its four parts in a random order per image.
        if spec.jitter_p > 0 and any(spec.jitter):
            b, ct, s, hue = spec.jitter
            jitter = torch.rand(n, generator=g) < spec.jitter_p
            bf, cf, sf, hf = [_uniform(n, max(0.0, 1 - v), 1 + v, g) for v in (b, ct, s)] + [_uniform(n, -hue, hue, g)]
            order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
            ops = {0: (b, lambda v, r: (v * per_image(bf, r)).clamp(0, 1)),
                   1: (ct, lambda v, r: _blend(v, _grayscale(v).mean(dim=(1, 2, 3), keepdim=True), per_image(cf, r))),
                   2: (s and c == 3, lambda v, r: _blend(v, _grayscale(v), per_image(sf, r))),
                   3: (hue and c == 3, lambda v, r: _adjust_hue(v, per_image(hf, r)))}
            for stage in range(4):
                for code, (enabled, op) in ops.items():
                    if enabled:
                        apply(torch.nonzero(jitter & (order[:, stage] == code)).flatten(), op)

        if spec.grayscale_p > 0 and c == 3:
            gray = torch.rand(n, generator=g) < spec.grayscale_p
            apply(torch.nonzero(gray).flatten(), lambda v, r: _grayscale(v).expand_as(v))

        if spec.blur_p > 0:
            blur = torch.rand(n, generator=g) < spec.blur_p
            sigma = _uniform(n, *spec.blur_sigma, g)
            ksize = blur_kernel_size(self.size)
            apply(torch.nonzero(blur).flatten(), lambda v, r: _gaussian_blur(v, sigma[r].to(dev), ksize))

        return (x - self.mean.to(dev)) / self.std.to(dev)


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
