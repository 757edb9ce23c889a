"""The image-folder input pipeline (harness.folder_views): crops in loader workers (uint8), colours on
the device. Its views follow the classic per-image pipeline's distributions, are the same with any
number of workers, and a run on a folder resumes mid-epoch bit-identically."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import fmnist_folder
from PIL import Image
from scipy import stats
from timing import hang_s
from torchvision import transforms as T

from harness.data.augment import AugmentSpec, BatchAugment, per_image_transform
from harness.data.datasets import NORMALIZATION, pretrain_views
from harness.data.folder_views import CropFlipPairs, FolderViews, draw_crops
from harness.run.config import make_config
from harness.run.runio import read_jsonl
from harness.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["imagefolder"])


def pattern_folder(root: Path, image: np.ndarray, n: int = 8) -> Path:
    """n copies of one HWC uint8 pattern as PNGs (lossless: the pattern is exactly what is decoded)."""
    for split in ("train", "val"):
        folder = root / split / "class0"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


FOLDER = ["data.dataset=imagefolder", "data.image_size=16", "optim.batch_size=8", "runtime.device=cpu",
          "data.num_workers=0"]


def both_paths(root: Path, spec: AugmentSpec, n: int = 1200) -> tuple[torch.Tensor, torch.Tensor]:
    """n views (de-normalised, in [0, 1]) of the folder's images through the classic per-image path
    and the new one, with the recipe replaced by `spec`, each from its own keys."""
    cfg = make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}", "data.loader=per_image"])
    old = pretrain_views(cfg, torch.device("cpu"))
    old.dataset.transform = per_image_transform(spec, 16, *NORMALIZATION["imagefolder"])
    new = pretrain_views(make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}"]), torch.device("cpu"))
    new.dataset.spec, new.augment = spec, BatchAugment(spec, 16, *NORMALIZATION["imagefolder"])
    size = new.size
    keys = [[((0, 0, step), i) for i in range(size)] for step in range(n // (2 * size))]
    views = []
    for path in (old, new):
        made = [path._items(k) if path is old else path._items(k, 0, step)[:2] for step, k in enumerate(keys)]
        views.append(torch.cat([torch.cat(pair) for pair in made]) * STD + MEAN)
    return views[0], views[1]


def binomial_close(a: float, b: float, n: int) -> bool:
    return abs(a - b) < 4 * (0.25 / n) ** 0.5 * 2 ** 0.5


def test_crop_scale_aspect_and_flips_follow_torchvision_on_folder_images():
    """The workers' crop boxes and flips for ImageNet-sized images, wide and tall, against
    torchvision's RandomResizedCrop.get_params (what the classic path draws)."""
    spec = AugmentSpec()
    for width, height in ((500, 375), (375, 500)):
        drawn = [draw_crops(((0, 0, k), i), width, height, spec) for k in range(30) for i in range(100)]
        boxes = torch.cat([b for b, _ in drawn]).double()
        ours = np.stack([(boxes[:, 2] * boxes[:, 3] / (width * height)).numpy(), (boxes[:, 3] / boxes[:, 2]).numpy()], 1)
        torch.manual_seed(0)
        ref = np.array([(h * w / (width * height), w / h) for _, _, h, w in
                        (T.RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
                         for _ in range(len(ours)))])
        for column in range(2):
            assert stats.ks_2samp(ours[:, column], ref[:, column]).pvalue > 1e-3
        flips = torch.cat([f for _, f in drawn]).float().mean().item()
        assert abs(flips - 0.5) < 0.02
        assert ((boxes[:, 0] + boxes[:, 2] <= height) & (boxes[:, 1] + boxes[:, 3] <= width)).all()


def test_a_view_is_the_drawn_crop_resized_and_flipped_even_from_a_reduced_decode(tmp_path):
    """What a worker hands over is PIL's crop + resize of the drawn box (flipped when drawn), within
    JPEG's DCT-scaling error when the decode was reduced (both crops >= twice the output side)."""
    from harness.benchmarks.folders import photo_like

    path = tmp_path / "photo.jpg"
    photo_like(np.random.default_rng(1)).save(path, quality=90)
    full = Image.open(path).convert("RGB")
    pairs = CropFlipPairs([(str(path), 0)], AugmentSpec(crop_scale=(0.6, 1.0)), 64)
    reduced = 0
    for k in range(12):
        key = ((0, 0, k), 0)
        boxes, flips = draw_crops(key, *full.size, pairs.spec)
        views = pairs[key][:2]
        reduced += int(min(boxes[:, 2].min(), boxes[:, 3].min()) >= 128)
        for (top, left, h, w), flip, view in zip(boxes.tolist(), flips.tolist(), views):
            ref = full.resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h))
            ref = torch.from_numpy(np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref).copy())
            assert view.dtype == torch.uint8 and view.shape == (64, 64, 3)
            assert (view.float() - ref.float()).abs().mean() < 3.0  # of 255: decode noise, not another crop
    assert reduced >= 3  # the reduced decode was exercised


def test_grayscale_and_jitter_rates_match_the_per_image_path(tmp_path):
    red = np.zeros((24, 24, 3), np.uint8)
    red[..., 0] = 200
    spec = AugmentSpec(jitter=(0.4, 0, 0, 0), jitter_p=0.8, grayscale_p=0.2, flip_p=0.0)
    old, new = both_paths(pattern_folder(tmp_path, red), spec)
    for views in (old, new):
        gray = (views[:, 1].mean((1, 2)) > 0.02).float().mean().item()  # green appears only after grayscale
        assert binomial_close(gray, 0.2, len(views)), gray
    # brightness factor (red channel over 200/255) among the coloured views: the same law in both paths
    factors = [v[v[:, 1].mean((1, 2)) < 0.02][:, 0].mean((1, 2)).numpy() / (200 / 255) for v in (old, new)]
    changed = [np.abs(f - 1) > 4e-3 for f in factors]
    assert binomial_close(changed[0].mean(), changed[1].mean(), len(factors[0]))
    assert abs(changed[1].mean() - 0.8) < 0.05
    assert stats.ks_2samp(factors[0][changed[0]], factors[1][changed[1]]).pvalue > 1e-3


def test_flip_and_blur_match_the_per_image_path(tmp_path):
    """A left-to-right ramp: flipped views run right-to-left (rate 1/2); the blur's effect on a
    vertical edge (rate 1/2, sigma uniform in [0.1, 2]) has one distribution in both paths."""
    ramp = np.zeros((16, 16, 3), np.uint8)
    ramp[:, :8] = 30
    ramp[:, 8:] = 220
    spec = AugmentSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.5)
    old, new = both_paths(pattern_folder(tmp_path, ramp), spec)
    flipped = [(v[:, 0, 8, 0] > v[:, 0, 8, -1]).float().mean().item() for v in (old, new)]
    assert all(binomial_close(f, 0.5, len(old)) for f in flipped), flipped
    # sharpness: the largest step between neighbouring columns (1 - blur spread over the edge)
    # on the uint8 grid (the classic path rounds there; de-normalised floats differ in their last bits)
    sharp = [np.round(v[:, 0].diff(dim=-1).abs().amax((1, 2)).numpy() * 255) for v in (old, new)]
    assert stats.ks_2samp(*sharp).pvalue > 1e-3
    blurred = [(s < s.max() - 12).mean() for s in sharp]  # sigma near 0.1 hardly blurs: below 1/2
    assert binomial_close(blurred[0], blurred[1], len(old)) and 0.3 < blurred[1] < 0.5


def test_workers_persist_and_any_count_gives_the_same_batches_from_any_step(tmp_path):
    """Two workers or none, the whole epoch or from step 2 of it (a resume), batch_at: one set of
    batches. The DataLoader's workers are started once for all epochs."""
    root = fmnist_folder(tmp_path, {"train": 48, "val": 6})
    cfg = lambda workers: make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}", "data.image_size=24",  # noqa: E731
                                                          f"data.num_workers={workers}"])
    two, none = (FolderViews(cfg(w), torch.device("cpu")) for w in (2, 0))
    straight = list(two.epoch(1, indices=True))
    workers = [w.pid for w in two.loader()._iterator._workers]
    tail = list(two.epoch(1, 2, indices=True))
    assert [w.pid for w in two.loader()._iterator._workers] == workers  # the same processes, not new ones
    assert len(straight) == 48 // 8 and len(tail) == len(straight) - 2
    for got in (list(none.epoch(1, indices=True)), [None, None, *tail], [two.batch_at(1, s) for s in range(6)]):
        for a, b in zip(straight, got):
            if b is not None:
                assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(straight[0][0], next(two.epoch(2))[0])  # another epoch, other views


def test_device_decode_gives_the_worker_paths_views_up_to_the_resize_kernel(tmp_path):
    """data.loader=device_decode: the same crops, flips and colours; only the resize implementation
    differs (torch's antialiased bilinear for PIL's)."""
    root = fmnist_folder(tmp_path, {"train": 16, "val": 6}, side=64)
    views = [pretrain_views(make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}", "data.image_size=32",
                                                           f"data.loader={loader}"]), torch.device("cpu"))
             for loader in ("batched", "device_decode")]
    a, b = (v.batch_at(0, 1) for v in views)
    assert torch.equal(a[2], b[2])
    for x, y in zip(a[:2], b[:2]):
        diff = ((x - y) * STD).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.25


@pytest.mark.slow
def test_a_run_on_an_image_folder_with_workers_resumes_mid_epoch_bit_identically(tmp_path, harness_cli):
    root = fmnist_folder(tmp_path / "data", {"train": 128, "val": 30})
    small = [*FOLDER, f"data.root={root}", "data.image_size=32", "data.num_workers=2", "optim.batch_size=32",
             "optim.epochs=2", "moco.queue_size=128", "moco.bn_splits=4", "model.arch=resnet_tiny",
             "model.stem=cifar", "moco.mlp=false", "moco.shuffle_bn=split", "eval.knn_every=0", "runtime.log_every=1",
             "runtime.checkpoint_every_steps=3", "runtime.threads=1"]

    def train(out: Path, fault: str | None = None):  # the run to be killed in a process of its own
        args = ["--recipe", "imagenet-r50-v2", "--no-probe", "--out", str(out), *(a for o in small for a in ("--set", o))]
        if fault is None:
            return harness_cli("train", *args)
        return subprocess.run([sys.executable, "-m", "harness.train", *args], capture_output=True, text=True,
                              timeout=hang_s(), env={**os.environ, "HARNESS_FAULT": fault})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight).returncode == 0
    # 4 steps an epoch; checkpoints every 3 steps: killed after step 7, it resumes from step 6 (epoch 2, step 2)
    assert train(resumed, "after-step-7").returncode == -signal.SIGKILL
    assert ckpt.load_latest(resumed / "checkpoints")["global_step"] == 6
    again = train(resumed)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
    a, b = (ckpt.load_latest(run / "checkpoints") for run in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = [[(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
              for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


FOLDER_STUDY = """\
description: an image-folder study end to end (real Fashion-MNIST images of 3 classes as JPEGs), one trial
recipe: imagenet-r50-v2
overrides: [data.root={root}, data.image_size=32, data.num_workers=1, optim.batch_size=32, optim.epochs=2,
            moco.queue_size=128, moco.bn_splits=4, moco.shuffle_bn=split, moco.mlp=false, model.arch=resnet_tiny,
            model.stem=cifar, eval.knn_every=1, eval.knn_train_subset=96, eval.knn_test_subset=60, eval.knn_k=20,
            eval.probe=standard, eval.probe_epochs=2, eval.probe_batch_size=32, eval.probe_lr=1.0,
            eval.probe_feature_bn=true, runtime.device=cpu, runtime.threads=1]
sampler: grid
factors: {{moco.momentum: [0.99]}}
seeds: [0]
objective: probe_top1
resources: {{gpus: 0, cpus: 1, mem_gb: 2, time_min: 10}}
"""


@pytest.mark.slow
def test_an_image_folder_study_runs_end_to_end_with_knn_monitor_and_probe(tmp_path):
    import optuna

    root = fmnist_folder(tmp_path / "data", {"train": 128, "val": 60})
    study = tmp_path / "folder_study.yaml"
    study.write_text(FOLDER_STUDY.format(root=root))
    env = {**os.environ, "HARNESS_RESULTS": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, "-m", "harness.study", str(study), "--executor", "local", "--poll", "1"],
                          capture_output=True, text=True, timeout=hang_s(), env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = tmp_path / "results" / "folder_study"
    trials = optuna.load_study(study_name="folder_study", storage=f"sqlite:///{results / 'study.db'}").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    run = results / "runs" / "momentum=0.99,seed=0"
    epochs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 < r["knn_top1"] <= 1 for r in epochs)
    probe = json.loads((run / "probe.json").read_text())
    assert probe["protocol"] == "standard" and (probe["train_size"], probe["test_size"]) == (128, 60)
    assert probe["top1"] > 0.5  # 3 classes far apart (chance 1/3)
    assert (results / "report" / "report.md").exists()


def test_the_dry_run_of_a_gpu_folder_study_says_how_many_loader_cores_a_gpu_needs(tmp_path, study_cli):
    """From the benchmarks' JSON files (results/bench): the loader's images/s per core (bench data)
    and what a GPU trains (the device check), or which command measures what is missing."""
    root = fmnist_folder(tmp_path / "data", {"train": 40, "val": 6})
    study = tmp_path / "gpu_folder.yaml"
    study.write_text(f"description: x\nrecipe: imagenet-r50-v2\noverrides: [data.root={root}]\n"
                     "factors: {moco.momentum: [0.99, 0.999]}\nseeds: [0]\n")
    results = tmp_path / "results"

    def dry_run() -> str:  # in this process: a plan submits nothing
        proc = study_cli(results, str(study), "--dry-run", "--executor", "local")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("input pipeline"))

    assert "not measured" in dry_run() and "python -m harness.bench data --recipe imagenet-r50-v2" in dry_run()
    (results / "bench").mkdir(parents=True)
    data_row = {"part": "data", "path": "batched", "recipe": "imagenet-r50-v2", "image_size": 224,
                "augmentation": "v2", "loader_images_per_s_per_core": 100.0}
    (results / "bench" / "bench-data-1.json").write_text(json.dumps(
        {"machine": "CPU X", "time": "2026-12-01T00:00:00", "rows": [data_row, {**data_row, "image_size": 64,
                                                                               "loader_images_per_s_per_core": 1e4}]}))
    line = dry_run()
    assert "a loader core makes 100 images/s (CPU X" in line and "10 cores per GPU for each 1000 images/s" in line
    gpu_row = {"part": "device", "check": "throughput batched", "recipe": "imagenet-r50-v2", "gpu": "NVIDIA H100",
               "images_per_s": 1450.0}
    (results / "bench" / "bench-device-1.json").write_text(json.dumps({"time": "2026-12-01T01:00:00",
                                                                       "rows": [gpu_row]}))
    line = dry_run()  # the recipe's 8 GPUs and 80 CPUs: 10 a GPU, 15 needed
    assert "a GPU trains 1450 images/s (NVIDIA H100" in line and "15 loader cores per GPU needed" in line
    assert "gives 10 CPUs per GPU (too few" in line


def test_a_run_walks_its_image_folder_once(tmp_path, monkeypatch):
    """Pretraining views, two kNN evaluations (train and val each time) and the probe's training set
    of one run read each split's file list once: ImageNet's train/ is 1.28M files, walked before on
    every evaluation on every rank. The items are ImageFolder's."""
    import torchvision.datasets.folder as tv_folder
    from torchvision import datasets

    from harness.data import datasets as data_mod
    from harness.data.augment import AugmentSpec
    from harness.data.folder_views import folder_index
    from harness.training.features import split_batches

    root = fmnist_folder(tmp_path / "data", {"train": 24, "val": 9})
    cfg = make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}", "data.num_workers=0"])
    walks = []
    real = tv_folder.make_dataset
    monkeypatch.setattr(tv_folder, "make_dataset", lambda directory, *a, **k: walks.append(str(directory)) or real(directory, *a, **k))
    folder_index.cache_clear()
    pretrain_views(cfg, torch.device("cpu"))
    for _ in range(2):
        for split in ("train", "test"):
            assert sum(len(labels) for _, labels in split_batches(cfg, split, torch.device("cpu"))) == (24 if split == "train" else 9)
    probe_set = data_mod.folder_probe_set(cfg, AugmentSpec())
    assert sorted(Path(w).name for w in walks) == ["train", "val"]
    reference = datasets.ImageFolder(str(root / "train"))
    assert probe_set.samples == tuple(reference.samples) and probe_set.classes == reference.classes
    assert probe_set.targets == reference.targets and data_mod.folder_classes(cfg) == len(reference.classes)


def test_device_decode_takes_cmyk_damaged_files_and_a_failed_batch_image_by_image(tmp_path, monkeypatch):
    """What nvjpeg cannot decode goes to the CPU, counted, never a crash: a CMYK JPEG (read from its
    header), a truncated JPEG (no decoder reads it: mid-gray), and a batched decode that fails (injected
    once). A whole epoch of views comes out, finite and of the right shape."""
    from PIL import Image

    from harness.run import faults

    root = fmnist_folder(tmp_path, {"train": 16, "val": 4}, side=48)
    files = sorted((root / "train").rglob("*.jpg"))
    Image.open(files[0]).convert("CMYK").save(files[0], "JPEG")
    whole = files[1].read_bytes()
    files[1].write_bytes(whole[:len(whole) * 2 // 3])  # cut mid-scan (header whole), as an interrupted copy leaves it
    cfg = make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}", "data.image_size=32", "data.loader=device_decode",
                                          "optim.batch_size=4", "data.num_workers=0"])
    monkeypatch.setenv("HARNESS_FAULT", "decode-batch")
    monkeypatch.setattr(faults, "_RAISED", set())
    views = pretrain_views(cfg, torch.device("cpu"))
    seen = 0
    for x_q, x_k, index in views.epoch(0, indices=True):
        assert x_q.shape == x_k.shape == (4, 3, 32, 32) and torch.isfinite(x_q).all() and torch.isfinite(x_k).all()
        seen += len(index)
    assert seen == views.steps_per_epoch * 4 == 16  # every image once
    decoded = views.decode_fallbacks
    assert decoded["batch_failed"] in (1, 2)  # the injected failure, and the batch holding the truncated file
    assert decoded["cmyk"] == 1 and decoded["unreadable"] == 1  # each file once an epoch


def test_device_decode_crops_and_resizes_a_batch_in_few_ops_close_to_an_antialiased_resize():
    """`_crop_resize`: both views of an image in one roi_align (bilinear samples averaged over each
    output pixel: an antialiased resize), flips for the whole batch: a few ops an image, not a slice,
    conversion, resize and flip per image and view; close to torch's antialiased bilinear resize."""
    import torch.nn.functional as F

    from harness.benchmarks.census import StepCensus
    from harness.data.folder_views import _crop_resize

    g = torch.Generator().manual_seed(0)
    smooth = lambda h, w: (F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear")  # noqa: E731
                           * 255).round().to(torch.uint8)[0]
    images = [smooth(64, 48), smooth(40, 56), smooth(72, 72), smooth(48, 64)]
    boxes = torch.tensor([[[4, 2, 40, 30], [0, 0, 64, 48]], [[10, 20, 12, 16], [1, 3, 30, 40]],
                          [[0, 0, 72, 72], [30, 31, 20, 18]], [[8, 8, 32, 32], [0, 10, 48, 50]]])  # (top, left, h, w)
    flips = torch.tensor([[False, True], [True, False], [False, False], [True, True]])
    census = StepCensus()
    with census:
        x_q, x_k = _crop_resize(images, boxes, flips, 24)
    assert x_q.shape == x_k.shape == (4, 3, 24, 24)
    assert census.summary()["ops"] <= 4 * len(images) + 20, census.ops
    for view, out in enumerate((x_q, x_k)):
        for i, image in enumerate(images):
            top, left, h, w = boxes[i, view].tolist()
            crop = image[None, :, top:top + h, left:left + w].float()
            ref = F.interpolate(crop, size=(24, 24), mode="bilinear", antialias=True, align_corners=False) / 255
            ref = ref.flip(-1) if flips[i, view] else ref
            assert (out[i] - ref[0]).abs().mean() < 0.01, (view, i)
