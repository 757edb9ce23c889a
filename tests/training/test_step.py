"""The training step a GPU can run at its own speed, counted on the CPU (harness.benchmarks.census):
no host sync and no blocking copy inside a step, few ops; one step for runs and benchmarks alike."""
import pytest
import torch
from image_folders import fmnist_folder

from harness.benchmarks.census import StepCensus, step_census
from harness.data import augment
from harness.run.config import make_config

# Budgets per step, stated at batch 64; the count does not depend on the batch (1,349 for cifar10-r18 at
# 8, 16, 32 and 64, measured), so BATCH counts the full ResNet-18 at 8 (one image per BN split), at a
# sixth of the CPU of 64. The census counted
# 2,535 ops for cifar10-r18 and 1,015 for fmnist-tiny
# before the step was rebuilt for GPUs (issue 34); 1,349 / 689 now (this machine, torch 2.14): SplitBatchNorm
# returns no autograd view (the in-place ReLU after it rebuilt its base in every backward), the
# colour jitter's brightness, contrast and saturation are one blend per stage, the similarities are
# Algorithm 1's bmm and mm. The issue's budgets: 1,500 and 700. Moves: the batch's indices and both
# views' augmentation parameters (in memory); both views' pixels, their colour parameters and the
# indices (image folders).
BUDGETS = {
    "cifar10-r18": {"ops": 1500, "moves": 2},
    "fmnist-tiny": {"ops": 700, "moves": 2},
    "imagenet-r50-v2": {"ops": 1150, "moves": 4},  # at small size: a tiny ResNet on 32-px folder images
}
FOLDER = ["data.image_size=32", "data.num_workers=1", "model.arch=resnet_tiny", "model.stem=cifar", "moco.mlp=false",
          "moco.queue_size=128", "runtime.device=cpu", "runtime.threads=1"]

BATCH = {"cifar10-r18": 8}  # the batch a recipe's step is counted at, where not 64 (see BUDGETS)


def _config(recipe: str, tmp_path, *extra: str):
    common = [f"optim.batch_size={BATCH.get(recipe, 64)}", "runtime.threads=1", "runtime.log_every=100",
              "eval.knn_every=0"]
    if recipe == "imagenet-r50-v2":
        root = fmnist_folder(tmp_path / "folder", {"train": 256, "val": 30}, suffix=".png", pool=(1200, 300))
        return make_config(recipe, [*common, *FOLDER, f"data.root={root}", *extra])
    return make_config(recipe, [*common, "moco.queue_size=256", "runtime.device=cpu", *extra])


@pytest.mark.parametrize("recipe", list(BUDGETS))
def test_a_steady_step_has_no_host_sync_no_blocking_copy_and_few_ops(recipe, tmp_path):
    counted = step_census(_config(recipe, tmp_path))
    assert counted["syncs"] == 0, counted["sync_ops"]
    assert counted["blocking_moves"] == 0 and counted["moves"] <= BUDGETS[recipe]["moves"], counted
    assert counted["ops"] <= BUDGETS[recipe]["ops"], counted["ops"]


@pytest.mark.parametrize("added", ["item", "blocking copy"])
def test_the_census_counts_a_sync_or_a_blocking_copy_added_to_the_augmentation(added, tmp_path, monkeypatch):
    apply_colour = augment.BatchAugment.apply_colour

    def with_fault(self, x, table):
        if added == "item":
            assert x.sum().item() is not None  # a read-back in the middle of the step
        else:
            x = x.to(x.device)  # .to(device) without non_blocking
        return apply_colour(self, x, table)

    monkeypatch.setattr(augment.BatchAugment, "apply_colour", with_fault)
    counted = step_census(_config("fmnist-tiny", tmp_path))
    assert (counted["syncs"] if added == "item" else counted["blocking_moves"]) >= 1, counted


def test_the_census_sees_data_dependent_shapes_on_tensors():
    census = StepCensus()
    x = torch.arange(10.0)
    with census:
        x[x > 4].sum()
        torch.nonzero(x)
    assert census.summary()["syncs"] == 2, census.sync_ops


def test_a_bench_step_and_a_run_step_from_the_same_state_give_the_same_parameters(tmp_path):
    """The benchmarks' step (training_step) and a run's first step: the same model, optimizer,
    learning rate and batch give bit-identical parameters after one step."""
    from harness.data.datasets import load_tensors, pretrain_views
    from harness.training import checkpoint as ckpt
    from harness.training.pretrain import train
    from harness.training.runtime import Runtime
    from harness.training.step import training_step

    cfg = make_config("fmnist-tiny", ["model.tiny_widths=[8,16,32]", "data.train_subset=64", "data.test_subset=64",
                                      "optim.batch_size=64", "optim.epochs=1", "moco.queue_size=128",
                                      "eval.knn_every=0", "eval.probe=none", "runtime.threads=1",
                                      ])
    train(cfg, tmp_path / "run", probe=False)
    run = ckpt.load_latest(tmp_path / "run" / "checkpoints")
    assert run["global_step"] == 1
    rt = Runtime.for_config(cfg).apply()
    views = pretrain_views(cfg, rt.device, splits=load_tensors(cfg))
    model, step = training_step(cfg, rt, views.size)
    step(*next(iter(views.epoch(0, indices=True))))
    state = model.state_dict()
    assert state.keys() == run["model"].keys()
    for name, value in state.items():
        assert torch.equal(value, run["model"][name]), name
