"""kNN monitor and linear probes."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from timing import hang_s
from torch import nn

from harness.data.datasets import load_tensors
from harness.model.backbones import build_backbone
from harness.run.config import make_config
from harness.training.knn import knn_predict
from harness.training.probe import FAST_L2_GRID, ProbeError, fast_probe, load_trained_encoder, standard_probe


def brute_force_knn(query, bank, labels, classes, k, t):
    query, bank = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    out = torch.zeros(len(query), classes)
    for i, q in enumerate(query):
        sims = [(float(q @ b), j) for j, b in enumerate(bank)]
        sims.sort(reverse=True)
        for sim, j in sims[:k]:
            out[i, labels[j]] += torch.exp(torch.tensor(sim / t))
    return out


def test_knn_matches_brute_force_reference_across_chunks():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(60, 5, generator=g), torch.randn(25, 5, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    fast = knn_predict(query, bank, labels, 4, k=7, t=0.1, chunk=8)
    ref = brute_force_knn(query, bank, labels, 4, 7, 0.1)
    assert torch.allclose(fast, ref, rtol=1e-5)
    assert torch.equal(fast.argmax(1), ref.argmax(1))


def separable(n, dim=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 4
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + 0.3 * torch.randn(n, dim, generator=g), y


def test_fast_probe_reaches_full_accuracy_on_separable_features():
    x, y = separable(600)
    result = fast_probe(x[:400], y[:400], x[400:], y[400:], 4)
    assert result["top1"] >= 0.99 and result["l2"] in FAST_L2_GRID


def test_fast_probe_hyperparameters_do_not_depend_on_test_labels():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 12, generator=g), torch.randint(0, 3, (500,), generator=g)
    x[:, 0] += y  # weakly informative
    tx, ty = torch.randn(200, 12, generator=g), torch.randint(0, 3, (200,), generator=g)
    a = fast_probe(x, y, tx, ty, 3)
    b = fast_probe(x, y, tx, ty[torch.randperm(200, generator=g)], 3)
    assert a["l2"] == b["l2"] and a["holdout_top1"] == b["holdout_top1"]


@pytest.fixture(scope="module")
def tiny():
    cfg = make_config("fmnist-tiny", ["data.train_subset=512", "data.test_subset=256", "eval.probe_epochs=2",
                                      "eval.probe_batch_size=128", "eval.probe_lr=1.0"])
    return cfg, load_tensors(cfg)


def test_standard_probe_leaves_backbone_unchanged_and_reports_best_and_last(tiny):
    cfg, splits = tiny
    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny", "cifar", 1)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = standard_probe(cfg, backbone, splits, torch.device("cpu"), 10)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert {"top1", "top5", "last_top1", "last_top5", "best_epoch"} <= result.keys()
    per_epoch = result["top1_per_epoch"]  # main_lincls reports the best epoch's accuracy, and the last
    assert len(per_epoch) == cfg.eval.probe_epochs and result["last_top1"] == per_epoch[-1]
    assert result["top1"] == max(per_epoch) and result["best_epoch"] == per_epoch.index(max(per_epoch)) + 1


def test_probe_crop_scale_one_is_flip_only():
    """Small-image recipes set eval.probe_crop_scale=[1, 1]: the probe's train view is then the test
    view or its mirror image, nothing else."""
    from harness.data.augment import RECIPES, AugmentSpec, BatchAugment, center_view

    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    spec = AugmentSpec(**{**RECIPES["probe"].__dict__, "crop_scale": (1.0, 1.0)})
    views = BatchAugment(spec, 28, (0.5,), (0.25,))(images, torch.Generator().manual_seed(0))
    plain = center_view(images, 28, (0.5,), (0.25,))
    same = (views - plain).abs().flatten(1).amax(1) < 1e-4
    mirrored = (views - plain.flip(-1)).abs().flatten(1).amax(1) < 1e-4
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 64


class Scaled(nn.Module):
    """Raw pixels times a constant: features of any scale, no parameters or buffers."""
    out_dim = 784

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return self.scale * x.flatten(1)


def test_probe_with_feature_bn_learns_features_of_any_scale_and_is_reproducible(tiny):
    _, splits = tiny
    cfg = make_config("fmnist-tiny", ["data.train_subset=512", "data.test_subset=256", "eval.probe_epochs=8",
                                      "eval.probe_batch_size=64", "eval.probe_lr=1.0",
                                      "eval.probe_crop_scale=[1.0, 1.0]", "eval.probe_feature_bn=true"])
    cpu = torch.device("cpu")
    first, second = (standard_probe(cfg, Scaled(1000.0), splits, cpu, 10) for _ in range(2))
    assert first["top1"] >= 0.6  # raw pixels: ~0.8 linearly on this subset
    assert first == second  # fc init, data order and views all derive from the run's seed


def test_probe_weight_decay_acts_on_the_fc_weight(tiny):
    _, splits = tiny
    common = ["data.train_subset=512", "data.test_subset=256", "eval.probe_epochs=4", "eval.probe_batch_size=64",
              "eval.probe_lr=0.1", "eval.probe_crop_scale=[1.0, 1.0]", "eval.probe_feature_bn=true"]
    cpu = torch.device("cpu")
    free = standard_probe(make_config("fmnist-tiny", common), Scaled(1.0), splits, cpu, 10)
    decayed = standard_probe(make_config("fmnist-tiny", common + ["eval.probe_weight_decay=1"]), Scaled(1.0),
                             splits, cpu, 10)
    assert free["top1"] >= 0.6
    assert decayed["fc_weight_norm"] < 0.3 * free["fc_weight_norm"]


def test_standard_probe_detects_a_backbone_that_changes(tiny):
    cfg, splits = tiny

    class Drifting(nn.Module):
        out_dim = 784

        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls += 1
            return x.flatten(1)

    with pytest.raises(ProbeError, match="backbone changed"):
        standard_probe(cfg, Drifting(), splits, torch.device("cpu"), 10)


def test_probe_refuses_a_run_without_checkpoint(tmp_path, harness_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: fmnist-tiny\n")
    with pytest.raises(ProbeError, match="no usable checkpoint"):
        load_trained_encoder(run, torch.device("cpu"))
    proc = harness_cli("probe", str(run))
    assert proc.returncode == 2 and "no usable checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_probe_rejects_a_checkpoint_of_another_architecture(tmp_path, capsys, harness_cli):
    run = tmp_path / "run"
    small = ["data.train_subset=256", "data.test_subset=128", "optim.batch_size=64", "optim.epochs=1",
             "moco.queue_size=256", "eval.knn_every=0", "eval.probe=none"]
    assert harness_cli("train", "--out", str(run), *[a for o in small for a in ("--set", o)]).returncode == 0
    # Re-probing may change probe settings, never what the checkpoint was trained with.
    proc = harness_cli("probe", str(run), "--set", "moco.dim=64")
    assert proc.returncode == 2 and "only eval.*, data.test_subset can change" in proc.stderr
    # How this machine evaluates may be said (device, threads, how features are read), in one line when wrong.
    from harness import probe

    assert probe.main([str(run), "--protocol", "fast", "--set", "runtime.precision=fp16"]) == 2
    assert "runtime.precision: fp16 is for CUDA" in capsys.readouterr().err
    assert probe.main([str(run), "--protocol", "fast", "--set", "runtime.compile=true"]) == 2
    assert "only runtime.device, runtime.threads, runtime.precision can change" in capsys.readouterr().err
    results = {}
    for precision in ("fp32", "bf16"):
        assert probe.main([str(run), "--protocol", "fast", "--set", f"runtime.precision={precision}",
                           "--set", "runtime.threads=1"]) == 0
        results[precision] = json.loads(capsys.readouterr().out)
    assert results["fp32"]["features_read_in"] == "float32" and results["bf16"]["features_read_in"] == "bfloat16"
    # ... and reached the extraction: the same checkpoint's features, read in bf16, are not fp32's
    from harness.training.features import extract_split
    from harness.training.runtime import inference_precision

    _, encoder, _ = load_trained_encoder(run, torch.device("cpu"))
    cfg = make_config("fmnist-tiny", small)
    with inference_precision("bf16"):
        low, _ = extract_split(encoder, cfg, "test", torch.device("cpu"), load_tensors(cfg), limit=16)
    full, _ = extract_split(encoder, cfg, "test", torch.device("cpu"), load_tensors(cfg), limit=16)
    assert not torch.equal(low, full) and torch.allclose(low, full, atol=0.1, rtol=0.05)
    config = (run / "config.yaml").read_text().replace("dim: 128", "dim: 64")
    (run / "config.yaml").write_text(config)
    with pytest.raises(ProbeError, match="does not fit the model"):
        load_trained_encoder(run, torch.device("cpu"))


@pytest.mark.slow
def test_image_folder_run_is_pretrained_and_probed_by_both_protocols(tmp_path, tiny, harness_cli):
    """The ImageNet layout (train/<class>/, val/<class>/), here with real Fashion-MNIST images of
    three classes saved as RGB PNGs: pretraining through the DataLoader path, then both probes."""
    from PIL import Image

    _, splits = tiny
    for split, images, labels in (("train", splits.train_images, splits.train_labels),
                                  ("val", splits.test_images, splits.test_labels)):
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            if label < 3:
                folder = tmp_path / "data" / split / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[0].numpy()).convert("RGB").save(folder / f"{i}.png")
    run = tmp_path / "run"
    small = ["data.dataset=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
             "data.num_workers=1", "optim.batch_size=32", "optim.epochs=1", "moco.queue_size=128",
             "moco.bn_splits=4", "eval.knn_every=0", "eval.probe=standard", "eval.probe_epochs=2",
             "eval.probe_batch_size=32", "eval.probe_lr=1.0", "eval.probe_feature_bn=true"]
    proc = harness_cli("train", "--out", str(run), *[a for o in small for a in ("--set", o)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    standard = json.loads((run / "probe.json").read_text())
    n_train = sum(1 for _ in (tmp_path / "data" / "train").rglob("*.png"))
    n_val = sum(1 for _ in (tmp_path / "data" / "val").rglob("*.png"))
    assert standard["protocol"] == "standard" and standard["top5"] == 1.0  # 3 classes: top-5 is certain
    assert (standard["train_size"], standard["test_size"]) == (n_train, n_val)
    # Trouser vs T-shirt vs pullover: linearly far apart even for a barely trained encoder (chance: 0.33).
    assert standard["top1"] > 0.6 and "pixel_floor_top1" not in standard
    proc = harness_cli("probe", str(run), "--protocol", "fast")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fast = json.loads((run / "probe-fast.json").read_text())
    assert (fast["train_size"], fast["test_size"]) == (n_train, n_val) and fast["top1"] > 0.6


def test_a_standard_probe_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, capsys, harness_cli):
    """The standard probe keeps each epoch's state (classifier, optimizer, schedule, best so far):
    killed after epoch 2 of 4, the same command goes on from there and gives the uninterrupted
    result; a probe with other settings never resumes from it; a finished probe leaves no state."""
    from harness import probe

    run = tmp_path / "run"
    small = ["data.train_subset=256", "data.test_subset=128", "optim.batch_size=64", "optim.epochs=1",
             "moco.queue_size=256", "eval.knn_every=0", "eval.probe=none", "model.tiny_widths=[8,16,32]"]
    assert harness_cli("train", "--out", str(run), *[a for o in small for a in ("--set", o)]).returncode == 0
    standard = [str(run), "--protocol", "standard", "--set", "eval.probe_epochs=4", "--set", "eval.probe_batch_size=64"]

    def written() -> list:  # settings other than config.yaml's: probe-standard-<key>.json (harness.run.evaluations)
        return sorted(run.glob("probe-standard-*.json"))

    def result() -> dict:
        out = json.loads(written()[0].read_text())
        return {k: v for k, v in out.items() if k != "seconds"}

    assert probe.main(standard) == 0
    straight = result()
    assert straight["settings"]["probe_epochs"] == 4
    assert not (run / "probe-standard-state").exists()  # spent once the result is written
    written()[0].unlink()
    killed = subprocess.run([sys.executable, "-m", "harness.probe", *standard], capture_output=True, text=True,
                            timeout=hang_s(), env={**os.environ, "HARNESS_FAULT": "probe-epoch@2"})
    assert killed.returncode == -9 and not written()
    capsys.readouterr()
    assert probe.main(standard) == 0
    assert "resumed the standard probe after epoch 2 of 4" in capsys.readouterr().out
    assert result() == straight and len(straight["top1_per_epoch"]) == 4
    # Other settings (here the learning rate) are another probe: it starts from its first epoch.
    (run / ".fault-probe-epoch@2").unlink()  # a fault fires once per run directory: arm it again
    again = subprocess.run([sys.executable, "-m", "harness.probe", *standard], capture_output=True, timeout=hang_s(),
                           env={**os.environ, "HARNESS_FAULT": "probe-epoch@2"})
    assert again.returncode == -9 and (run / "probe-standard-state" / "state.pt").exists()
    capsys.readouterr()
    assert probe.main([*standard, "--set", "eval.probe_lr=3"]) == 0
    assert "resumed" not in capsys.readouterr().out
