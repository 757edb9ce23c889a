"""Dictionary diagnostics (harness.training.diagnostics): they measure the run without changing it, and they
measure what they say -- checked on runs whose answer is known."""
import json

import pytest
import torch

from harness.run.config import make_config
from harness.training import checkpoint as ckpt
from harness.training.pretrain import train

TINY = ["model.tiny_widths=[8,16,32]", "data.train_subset=512", "data.test_subset=256", "optim.batch_size=64", "optim.epochs=2",
        "moco.queue_size=256", "moco.bn_splits=4", "eval.pixel_floor=false", "eval.knn_every=0", "eval.probe=none"]


def _run(tmp_path, name, *overrides):
    cfg = make_config("fmnist-tiny", [*TINY, *overrides])
    run_dir = tmp_path / name
    train(cfg, run_dir)
    epochs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    return cfg, run_dir, epochs


@pytest.mark.parametrize("key_encoder", ["momentum", "memory_bank"])
def test_training_with_diagnostics_is_bit_identical_to_training_without(tmp_path, key_encoder):
    """With the kNN monitor and the diagnostics every epoch, and with neither: losses, parameters,
    BatchNorm statistics, queue (or bank) and optimizer state all equal, and the run's identity too
    (evaluation is not part of it: harness.run.identity.EVALUATION)."""
    mech = [f"moco.key_encoder={key_encoder}", "moco.symmetric=true"] if key_encoder == "momentum" else \
        [f"moco.key_encoder={key_encoder}"]
    cfg_on, on, with_diag = _run(tmp_path, "on", *mech, "eval.diagnostics_every=1", "eval.knn_every=1",
                                 "eval.knn_train_subset=256")
    cfg_off, off, without = _run(tmp_path, "off", *mech, "eval.diagnostics_every=0")
    assert all("key_consistency" in r and "alignment" in r and "knn_top1" in r for r in with_diag)
    assert not any("key_consistency" in r or "knn_top1" in r for r in without)
    assert [r["loss"] for r in with_diag] == [r["loss"] for r in without]
    a, b = ckpt.load_latest(on / "checkpoints"), ckpt.load_latest(off / "checkpoints")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # queue/bank and BN buffers included
    assert all(torch.equal(x, y) for x, y in zip(torch.utils._pytree.tree_leaves(a["optimizer"]["state"]),
                                                torch.utils._pytree.tree_leaves(b["optimizer"]["state"])))
    assert cfg_on.digest() == cfg_off.digest()


def test_a_key_encoder_that_never_changes_gives_consistency_one_at_every_age(tmp_path):
    """m = 1: theta_k stays what it was at step 0, so the fresh keys are the stored ones exactly."""
    _, _, epochs = _run(tmp_path, "m1", "moco.momentum=1.0", "eval.diagnostics_every=1")
    ages = epochs[-1]["key_consistency_ages"]
    assert [age for age, _ in ages] == [1, 2, 4]  # newest, 1/4 (= 1/2 here), oldest: K / B = 4 blocks
    assert all(value == pytest.approx(1.0, abs=1e-6) for _, value in ages)
    assert ages[0] == [1, 1.0]  # the newest block: the key encoder as it is now, 1 by construction


def test_momentum_zero_makes_old_keys_less_consistent_than_momentum_099(tmp_path):
    """Same seed, same data: with m = 0 the key encoder is the query encoder of the step, so a key a few
    SGD steps old no longer matches; with m = 0.99 it has barely moved (the paper's argument). At the
    recipe's widths: a narrow encoder moves too little in 8 steps for the gap to show."""
    recipe = "model.tiny_widths=[32,64,128]"
    _, _, zero = _run(tmp_path, "m0", "moco.momentum=0.0", "optim.epochs=1", "eval.diagnostics_every=1", recipe)
    _, _, slow = _run(tmp_path, "m099", "moco.momentum=0.99", "optim.epochs=1", "eval.diagnostics_every=1", recipe)
    zero_ages, slow_ages = dict(zero[-1]["key_consistency_ages"]), dict(slow[-1]["key_consistency_ages"])
    assert zero[-1]["key_consistency"] < slow[-1]["key_consistency"] - 0.1
    assert zero_ages[4] < zero_ages[2] < zero_ages[1]  # older keys, less consistent
    assert all(slow_ages[a] > zero_ages[a] for a in (2, 4))


def test_a_memory_bank_entry_just_updated_is_closer_than_an_old_one(tmp_path):
    """bank_momentum 0: an entry is the query feature of its last update; the newest entries (updated
    one step ago) match the current encoder better than those updated an epoch ago."""
    _, _, epochs = _run(tmp_path, "bank", "moco.key_encoder=memory_bank", "moco.bank_momentum=0.0",
                        "eval.diagnostics_every=1")
    ages = dict(epochs[-1]["key_consistency_ages"])
    assert sorted(ages) == [1, 2, 4, 8]  # 8 steps an epoch
    assert ages[1] > ages[8] and ages[1] > 0.9


def test_under_ddp_the_fresh_keys_are_laid_out_as_the_queue_stored_them(tmp_path):
    """2 gloo ranks, Shuffle BN across them (ddp), symmetric loss: with m = 1 the regenerated keys of
    every rank, gathered in rank order, are the stored ones exactly -- any other layout (or another
    permutation) would fall far below 1. A collective left waiting fails within the group's timeout."""
    from test_gpu_paths import ddp_train

    ddp_train(tmp_path / "run", "moco.momentum=1.0", "moco.shuffle_bn=ddp", "moco.symmetric=true",
              "optim.epochs=2", "eval.knn_every=0", "eval.diagnostics_every=1")
    epochs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    ages = epochs[-1]["key_consistency_ages"]
    assert len(ages) >= 2 and all(value == pytest.approx(1.0, abs=1e-5) for _, value in ages)
    assert "alignment" in epochs[-1]
