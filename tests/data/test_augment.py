"""The batched augmentations draw the same parameter distributions as the torchvision recipe."""
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms as T

from harness.data.augment import RECIPES, AugmentSpec, BatchAugment, sample_crops


def torchvision_crops(n, height, width, spec, seed=0):
    torch.manual_seed(seed)
    image = torch.zeros(1, height, width)
    boxes = [T.RandomResizedCrop.get_params(image, list(spec.crop_scale), list(spec.crop_ratio)) for _ in range(n)]
    return np.array([(h * w / (height * width), w / h) for _, _, h, w in boxes])


@pytest.mark.parametrize("height,width", [(32, 32), (28, 28), (24, 40)])
def test_crop_scale_and_aspect_distributions_match_torchvision(height, width):
    spec = RECIPES["v2"]
    top, left, h, w = sample_crops(6000, height, width, spec, torch.Generator().manual_seed(1))
    ours = np.stack([(h * w).numpy() / (height * width), (w / h).numpy()], 1)
    ref = torchvision_crops(6000, height, width, spec)
    for column in range(2):
        assert stats.ks_2samp(ours[:, column], ref[:, column]).pvalue > 1e-3
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()


def constant_batch(n, value=100, channels=3, size=8):
    return torch.full((n, channels, size, size), value, dtype=torch.uint8)


def test_flip_rate_is_one_half():
    spec = AugmentSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0)
    aug = BatchAugment(spec, 8, (0.0,), (1.0,))
    ramp = torch.arange(8, dtype=torch.uint8).repeat(4000, 1, 8, 1) * 30  # increasing left to right
    out = aug(ramp, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).float().mean().item()
    assert abs(flipped - 0.5) < 0.03


def test_grayscale_rate_and_jitter_probability():
    spec = AugmentSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter=(0, 0, 0, 0), jitter_p=0.0,
                       grayscale_p=0.2, flip_p=0.0)
    aug = BatchAugment(spec, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    colour = torch.zeros(5000, 3, 4, 4, dtype=torch.uint8)
    colour[:, 0] = 200  # pure red
    out = aug(colour, torch.Generator().manual_seed(0))
    gray = (out[:, 1, 0, 0] > 0).float().mean().item()  # green appears only after grayscale
    assert abs(gray - 0.2) < 0.02


def test_brightness_factor_range_and_jitter_probability():
    spec = AugmentSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter=(0.4, 0, 0, 0), jitter_p=0.8,
                       grayscale_p=0.0, flip_p=0.0)
    aug = BatchAugment(spec, 4, (0.0,), (1.0,))
    out = aug(constant_batch(5000, 100, channels=1, size=4), torch.Generator().manual_seed(0))
    factor = (out[:, 0, 0, 0] / (100 / 255)).numpy()
    assert factor.min() >= 0.6 - 1e-4 and factor.max() <= 1.4 + 1e-4
    changed = np.abs(factor - 1) > 1e-6
    assert abs(changed.mean() - 0.8) < 0.02
    # among the jittered ones, the factor is uniform on [0.6, 1.4] as in ColorJitter
    assert stats.kstest(factor[changed], stats.uniform(0.6, 0.8).cdf).pvalue > 1e-3


def test_hue_shift_matches_torchvision_adjust_hue():
    from torchvision.transforms.v2 import functional as F

    from harness.data.augment import _adjust_hue

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 5, generator=g)
    shift = torch.linspace(-0.4, 0.4, 6)
    ours = _adjust_hue(x, 6.0 * shift.view(6, 1, 1, 1))  # in sixths of a turn
    for i in range(6):
        assert torch.allclose(ours[i], F.adjust_hue(x[i], shift[i].item()), atol=1e-4)


def test_views_are_deterministic_given_the_generator_seed():
    aug = BatchAugment(RECIPES["v2"], 16, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    a = aug(images, torch.Generator().manual_seed(5))
    b = aug(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (8, 3, 16, 16)


def test_brightness_contrast_and_saturation_match_torchvision():
    """One blend per jitter stage (`_blend_parts`): each image gets its own part and factor."""
    from torchvision.transforms.v2 import functional as F

    from harness.data.augment import _blend_parts

    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    factors = [0.6, 1.0, 1.4]
    f = torch.tensor(factors).view(3, 1, 1, 1)
    none = torch.zeros(3, 1, 1, 1)
    brightness = _blend_parts(x, f, none, none)
    contrast = _blend_parts(x, f, none, 1 - f)
    saturation = _blend_parts(x, f, 1 - f, none)
    for i, factor in enumerate(factors):
        assert torch.allclose(brightness[i], F.adjust_brightness(x[i], factor), atol=1e-5)
        assert torch.allclose(contrast[i], F.adjust_contrast(x[i], factor), atol=1e-5)
        assert torch.allclose(saturation[i], F.adjust_saturation(x[i], factor), atol=1e-5)
    parts = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]).view(3, 2, 1, 1)  # contrast, identity, saturation
    mixed = _blend_parts(x, f, (1 - f) * parts[:, :1], (1 - f) * parts[:, 1:])
    assert torch.equal(mixed[0], contrast[0]) and torch.equal(mixed[1], x[1]) and torch.equal(mixed[2], saturation[2])


def test_data_crop_scale_reaches_both_view_paths():
    # data.crop_scale replaces the named recipe's crop range, in the batched and the per-image path.
    from torchvision.transforms import v2

    from harness.data.datasets import InMemoryViews, LoaderViews
    from harness.run.config import make_config

    cfg = make_config("fmnist-tiny", ["data.crop_scale=[0.5, 1]", "optim.batch_size=8"])
    images = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    assert InMemoryViews(images, cfg, torch.device("cpu")).augment.spec.crop_scale == (0.5, 1.0)
    crops = [t for t in LoaderViews(cfg, torch.device("cpu"), images=images).dataset.transform.transforms
             if isinstance(t, v2.RandomResizedCrop)]
    assert [tuple(c.scale) for c in crops] == [(0.5, 1.0)]
    assert RECIPES["cifar"].crop_scale == (0.2, 1.0)  # the recipe itself is untouched
