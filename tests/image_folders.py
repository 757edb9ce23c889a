"""Image folders for the tests: the ImageNet layout (train/<class>/, val/<class>/) of real Fashion-MNIST
images, shared by the data, training and benchmark tests (tests/ is on sys.path, tests/conftest.py)."""
from pathlib import Path


def fmnist_folder(root: Path, per_split: dict[str, int], classes: int = 3, side: int = 28, suffix: str = ".jpg",
                  pool: tuple[int, int] = (1200, 600)) -> Path:
    """Real Fashion-MNIST images of `classes` classes as RGB files of `side` pixels (JPEG at quality 90,
    or lossless PNG): the first `per_split[split]` of the split's seeded subset of `pool` (train, test)."""
    from PIL import Image

    from harness.data.datasets import load_tensors
    from harness.run.config import make_config

    splits = load_tensors(make_config("fmnist-tiny", [f"data.train_subset={pool[0]}", f"data.test_subset={pool[1]}"]))
    sources = {"train": (splits.train_images, splits.train_labels), "val": (splits.test_images, splits.test_labels)}
    for split, n in per_split.items():
        images, labels = sources[split]
        kept = [(i, int(y)) for i, y in enumerate(labels) if y < classes][:n]
        for i, label in kept:
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i][0].numpy()).convert("RGB")
            if side != image.size[0]:
                image = image.resize((side, side), Image.BICUBIC)
            image.save(folder / f"{i}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return root
