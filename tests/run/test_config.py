"""Bad configuration fails before training, naming the field and the fix."""
import re
import subprocess
import sys

import pytest
from timing import hang_s

from harness.run.config import make_config, recipe_names
from harness.run.datafiles import check_dataset
from harness.run.errors import ConfigError
from harness.run.validation import validate


def test_every_recipe_loads_and_validates():
    assert {"fmnist-tiny", "cifar10-r18", "cifar10-r18-v2", "imagenet-r50-v1", "imagenet-r50-v2"} <= set(recipe_names())
    for name in recipe_names():
        cfg = make_config(name)
        assert cfg.recipe == name


def test_recipes_carry_the_paper_hyperparameters():
    v1, v2 = make_config("imagenet-r50-v1"), make_config("imagenet-r50-v2")
    assert (v1.moco.queue_size, v1.moco.momentum, v1.moco.temperature, v1.moco.mlp) == (65536, 0.999, 0.07, False)
    assert (v2.moco.temperature, v2.moco.mlp, v2.data.augmentation, v2.optim.schedule) == (0.2, True, "v2", "cosine")
    colab = make_config("cifar10-r18")
    assert (colab.optim.batch_size, colab.scaled_lr(), colab.moco.queue_size, colab.moco.bn_splits) == (512, 0.06, 4096, 8)


def test_dotted_overrides_are_typed():
    cfg = make_config("fmnist-tiny", ["moco.momentum=0.999", "moco.mlp=true", "optim.milestones=[3, 6]"])
    assert cfg.moco.momentum == 0.999 and cfg.moco.mlp is True and cfg.optim.milestones == [3, 6]


def error_of(*overrides, recipe="fmnist-tiny") -> str:
    with pytest.raises(ConfigError) as info:
        make_config(recipe, list(overrides))
    return str(info.value)


def test_queue_not_a_multiple_of_the_global_batch():
    msg = error_of("moco.queue_size=1000")
    assert "moco.queue_size" in msg and "multiple" in msg and "K=1024" in msg


def test_symmetric_loss_needs_a_multiple_of_twice_the_batch():
    assert "symmetric" in error_of("moco.symmetric=true", "moco.queue_size=768")


@pytest.mark.parametrize("m", [-0.1, 1.5])
def test_momentum_outside_unit_interval(m):
    assert "moco.momentum" in error_of(f"moco.momentum={m}")


@pytest.mark.parametrize("t", [0, -0.2])
def test_temperature_not_positive(t):
    assert "moco.temperature" in error_of(f"moco.temperature={t}")


@pytest.mark.parametrize("override", ["eval.probe_crop_scale=[0.5, 0.2]", "eval.probe_crop_scale=[0, 1]",
                                      "eval.probe_crop_scale=[0.5]", "eval.probe_lr=0", "eval.probe_epochs=0",
                                      "eval.probe_weight_decay=-0.1",
                                      "eval.knn_k=0", "data.crop_scale=[1, 0.5]", "data.crop_scale=[0, 1]",
                                      "model.tiny_stem_stride=3", "model.tiny_widths=[16, 0]"])
def test_bad_probe_and_knn_settings(override):
    assert override.split("=")[0] in error_of(override)


@pytest.mark.parametrize("stride,side", [(1, 28), (2, 14)])
def test_tiny_resnet_widths_and_stem_stride_come_from_the_config(stride, side):
    import torch

    from harness.model.moco import build_moco

    cfg = make_config("fmnist-tiny", ["model.tiny_widths=[8, 16, 24]", f"model.tiny_stem_stride={stride}"])
    backbone = build_moco(cfg).encoder_q.backbone
    x = torch.zeros(8, 1, 28, 28)  # the recipe's SplitBN needs a multiple of its 8 splits
    assert backbone.stem(x).shape[-2:] == (side, side)
    assert backbone(x).shape == (8, 24) and backbone.out_dim == 24


def test_unknown_key_suggests_the_right_one():
    msg = error_of("moco.momentun=0.9")
    assert "moco.momentun" in msg and "momentum" in msg


def test_yes_no_choices_survive_yaml_booleans():
    assert make_config("fmnist-tiny", ["runtime.channels_last=yes"]).runtime.channels_last == "yes"
    assert make_config("fmnist-tiny", ["runtime.channels_last=no"]).runtime.channels_last == "no"


def test_wrong_type():
    assert "moco.queue_size" in error_of("moco.queue_size=big")


def test_unknown_dataset():
    msg = error_of("data.dataset=imagenet21k")
    assert "data.dataset" in msg and "fashion_mnist" in msg


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'fmnist-tiy'.*fmnist-tiny"):
        make_config("fmnist-tiy")


def test_missing_dataset_files(tmp_path):
    cfg = make_config("cifar10-r18", [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.root: cifar10 files not found .*cannot download"):
        check_dataset(cfg)
    folder = make_config("imagenet-r50-v1", [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="train/<class>"):
        check_dataset(folder)


def test_world_size_checks_batch_split_and_ddp_shuffle():
    cfg = make_config("imagenet-r50-v1")
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="shuffle_bn.*one process"):
        validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="not divisible by the 7 processes"):
        validate(cfg, world_size=7)


def test_cli_rejects_bad_input_before_creating_anything(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "harness.train", "--recipe", "fmnist-tiny", "--set",
                           "moco.temperature=0", "--out", str(out)], capture_output=True, text=True, timeout=hang_s())
    assert proc.returncode == 2
    assert "moco.temperature" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("resources, message", [
    ("{trials_per_job: 0}", "resources.trials_per_job: at least 1 is required"),
    ("{trials_per_job: 1.5}", "resources.trials_per_job: a whole number is required"),
    ("{trials_per_job: 2, gpus: 2}", "a trial with several GPUs, tasks or nodes (DDP) cannot be packed"),
    ("{trials_per_job: 4, cpus: 2}", "4 trials a job need at least 4 cpus (one thread each), got cpus: 2"),
])
def test_impossible_trial_packing_is_named_in_the_study_file(tmp_path, resources, message):
    from harness.planning.studyfile import StudyError, load_study

    path = tmp_path / "packed.yaml"
    path.write_text(f"description: x\nrecipe: fmnist-tiny\nfactors: {{moco.momentum: [0.9]}}\nseeds: [0]\n"
                    f"resources: {resources}\n")
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(str(path)).resources_for()
