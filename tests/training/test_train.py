"""Training runs on real Fashion-MNIST: exact resume after SIGKILL, checkpoint fallback, divergence."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faces import CliResult, run_main
from timing import hang_s

from harness.run.runio import read_jsonl
from harness.training import checkpoint as ckpt

SMALL = ["model.tiny_widths=[8,16,32]", "data.train_subset=512", "data.test_subset=256", "optim.batch_size=64", "optim.epochs=2",
         "moco.queue_size=256", "runtime.log_every=1", "eval.knn_every=0", "eval.probe=none",
         "runtime.checkpoint_every=2", "runtime.checkpoint_every_steps=3", "runtime.threads=1"]


def run_train(out: Path | None, *extra: str, fault: str | None = None, env: dict | None = None,
              cwd: Path | None = None, subprocess_only: bool = False) -> subprocess.CompletedProcess | CliResult:
    """`python -m harness.train` on fmnist-tiny at SMALL size. A run that is to be SIGKILLed (a fault),
    or needs its own environment, is a subprocess; any other runs in this process (faces.run_main;
    `runtime.threads=1` either way)."""
    args = ["--recipe", "fmnist-tiny", "--no-probe", *(["--out", str(out)] if out else [])]
    for override in [*SMALL, *extra]:
        args += ["--set", override]
    if fault or env or cwd or subprocess_only:
        env = {**os.environ, **(env or {}), **({"HARNESS_FAULT": fault} if fault else {})}
        return subprocess.run([sys.executable, "-m", "harness.train", *args], capture_output=True, text=True,
                              timeout=hang_s(), env=env, cwd=cwd)
    return run_main("train", args)


def final_state(out: Path) -> dict:
    return ckpt.load_latest(out / "checkpoints")


def step_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]


@pytest.mark.parametrize("key_encoder", ["momentum", "memory_bank"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, key_encoder):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    which = f"moco.key_encoder={key_encoder}"
    assert run_train(straight, which).returncode == 0
    # 8 steps per epoch; checkpoints every 3 steps: killed after step 11, it resumes from step 9 (mid-epoch).
    killed = run_train(resumed, which, fault="after-step-11")
    assert killed.returncode == -signal.SIGKILL
    assert final_state(resumed)["global_step"] == 9
    again = run_train(resumed, which)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout

    a, b = final_state(straight), final_state(resumed)
    assert a["global_step"] == b["global_step"] == 16
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:  # parameters, BN statistics, queue and queue_ptr (or the memory bank)
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert ("bank" in a["model"]) == (key_encoder == "memory_bank")
    assert step_losses(straight) == step_losses(resumed)  # no duplicated or missing steps either
    epochs = [r["epoch"] for r in read_jsonl(resumed / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1, 2]


def test_default_run_dir_follows_harness_results(tmp_path):
    # Single runs land where studies do: $HARNESS_RESULTS/runs/<recipe>, not ./results in the cwd.
    results = tmp_path / "elsewhere"
    proc = run_train(None, "optim.epochs=1", env={"HARNESS_RESULTS": str(results)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert final_state(results / "runs" / "fmnist-tiny")["global_step"] == 8
    assert not (tmp_path / "results").exists()


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "optim.epochs=1").returncode == 0
    newest, previous = ckpt.checkpoints(out / "checkpoints")[:2]
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        state = ckpt.load_latest(out / "checkpoints")
    assert state["path"] == str(previous)
    foreign = out / "checkpoints" / "ckpt-999999999.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.warns(UserWarning, match="not a moco-harness checkpoint"):
        assert ckpt.load_latest(out / "checkpoints")["path"] == str(previous)


def test_interrupted_checkpoint_write_leaves_previous_usable(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert run_train(straight, "optim.epochs=1").returncode == 0
    killed = run_train(out, "optim.epochs=1", fault="checkpoint-before-rename@6")  # the second save
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.checkpoints(out / "checkpoints")] == ["ckpt-000000003.pt"]  # the previous one
    assert (out / "checkpoints" / ".ckpt-000000006.pt.tmp").exists()  # the cut write, never renamed
    again = run_train(out, "optim.epochs=1")
    assert again.returncode == 0 and "(epoch 0, step 3)" in again.stdout  # resumed from the previous one
    a, b = final_state(straight), final_state(out)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_divergence_is_recorded_not_a_crash(tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, "optim.lr=1.0e+30", "optim.epochs=1")
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged", proc.stderr
    assert proc.returncode == 3 and "Traceback" not in proc.stderr


def test_rerun_with_a_different_config_refuses_to_mix_runs(tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "optim.epochs=1").returncode == 0
    proc = run_train(out, "optim.epochs=1", "moco.momentum=0.9")
    assert proc.returncode == 2 and "moco.momentum" in proc.stderr


@pytest.mark.slow
def test_fmnist_tiny_recipe_learns(tmp_path):
    """The CPU recipe on real Fashion-MNIST, shortened for CI (2048 training images, 3 epochs at batch
    64, one thread, in this process; the kNN monitor on 1k test images, the probe on 2k; the full
    recipe's figures are in the README): the loss falls, the
    kNN monitor rises, the probe reports a pixel floor and beats the untrained encoder (measured:
    0.785 vs 0.758; 4096 images at batch 128, the same 96 steps at twice the images, gave 0.798 vs 0.766
    for twice the CPU)."""
    out = tmp_path / "fmnist-tiny"
    short = ["optim.epochs=3", "optim.batch_size=64", "optim.lr_batch=64", "data.test_subset=2000",
             "data.train_subset=2048", "eval.knn_every=1", "eval.knn_test_subset=1000", "runtime.threads=1"]
    proc = run_main("train", ["--recipe", "fmnist-tiny", "--out", str(out), *(a for key in short for a in ("--set", key))])
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert epochs[-1]["knn_top1"] > epochs[0]["knn_top1"]
    probe = json.loads((out / "probe.json").read_text())
    assert probe["protocol"] == "fast" and 0.5 < probe["pixel_floor_top1"] < 0.95
    # Pretraining, not the architecture, earns the probe's accuracy: the same encoder untrained (its
    # initial weights, same seed) probes lower. (Random conv features alone reach ~0.8 here.)
    from harness.model.moco import build_moco
    from harness.run.config import make_config
    from harness.training.probe import probe_backbone

    cfg = make_config("fmnist-tiny", [*short, "eval.pixel_floor=false"])
    torch.manual_seed(cfg.runtime.seed)
    untrained = probe_backbone(cfg, build_moco(cfg).encoder_q.backbone, None, torch.device("cpu"), "fast")
    assert probe["top1"] > untrained["top1"] + 0.01, (probe["top1"], untrained["top1"])


def test_a_second_process_cannot_train_in_a_busy_run_directory(tmp_path):
    from harness.run.runio import RunDirBusy, lock_run_dir

    held = lock_run_dir(tmp_path / "run")
    proc = run_train(tmp_path / "run", "optim.epochs=1", subprocess_only=True)  # another process
    assert proc.returncode != 0 and "another process is training in this run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    held.close()
    again = lock_run_dir(tmp_path / "run")  # free once its holder lets go
    with pytest.raises(RunDirBusy):
        lock_run_dir(tmp_path / "run")
    again.close()


def test_a_seed_means_the_same_start_data_order_and_augmentation_at_every_level(tmp_path):
    """What makes paired comparisons paired: at one seed, levels of m and K start from the same query
    encoder and see the same batches (order and augmentation); another seed does not."""
    from harness.run.config import make_config
    from harness.training.pretrain import PretrainRun
    from harness.training.runtime import Runtime

    def start(*overrides):
        cfg = make_config("fmnist-tiny", [*SMALL, *overrides])
        run = PretrainRun(cfg, tmp_path, Runtime.for_config(cfg), 0, 1)
        batches = [b for epoch in (0, 1) for _, b in zip(range(2), run.views.epoch(epoch))]
        return run.model.encoder_q.state_dict(), batches

    (w_a, b_a), (w_b, b_b), (w_c, b_c) = (start("moco.momentum=0.9", "runtime.seed=3"),
                                          start("moco.momentum=0.999", "moco.queue_size=512", "runtime.seed=3"),
                                          start("moco.momentum=0.9", "runtime.seed=4"))
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert all(torch.equal(x, y) for pair_a, pair_b in zip(b_a, b_b) for x, y in zip(pair_a, pair_b))
    assert not all(torch.equal(w_a[k], w_c[k]) for k in w_a)
    assert not torch.equal(b_a[0][0], b_c[0][0])


def test_a_torn_last_line_of_metrics_is_skipped_and_dropped_on_resume(tmp_path):
    """A crash mid-write leaves half a JSON line: readers skip it, and resuming rewrites the file
    without it (and without records past the checkpoint being resumed)."""
    from harness.run.runio import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1, "loss": 5.0}\n{"kind": "step", "step": 2, "loss": 4.9}\n'
                    '{"kind": "epoch", "epoch": 1, "step": 2}\n{"kind": "step", "step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 2]
    truncate_metrics(path, global_step=1)  # resuming from the checkpoint at step 1
    assert path.read_text() == '{"kind": "step", "step": 1, "loss": 5.0}\n'


def test_a_second_job_of_the_same_trial_waits_for_the_first_then_goes_on(tmp_path):
    """A driver killed after starting a job but before recording it starts the trial again; the
    second job must wait for the first (here: a held lock) instead of failing the trial."""
    import threading

    from harness.run.config import make_config
    from harness.run.runio import lock_run_dir
    from harness.training.pretrain import train

    held = lock_run_dir(tmp_path / "run")
    cfg = make_config("fmnist-tiny", [*SMALL, "optim.epochs=1"])
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(train(cfg, tmp_path / "run", probe=False, wait_for_lock=True)))
    job.start()
    job.join(2.0)
    assert job.is_alive() and not (tmp_path / "run" / "metrics.jsonl").exists()  # waiting: neither failed nor training
    held.close()  # the first job ends
    job.join(300)
    assert result.get("status") == "completed" and result["global_step"] == 8


def test_learning_rate_schedule_warm_up_cosine_and_step_values():
    """The official code's schedules (main_moco.adjust_learning_rate), per epoch, after a linear
    warm-up per step; the base is optim.lr scaled by batch / lr_batch."""
    import math

    from harness.run.config import make_config
    from harness.training.pretrain import learning_rate

    cfg = make_config("fmnist-tiny", ["optim.lr=0.4", "optim.lr_batch=256", "optim.batch_size=128", "optim.epochs=10",
                                      "optim.warmup_epochs=2"])
    base = 0.2  # 0.4 x 128 / 256
    assert learning_rate(cfg, 0, 0, 5) == pytest.approx(base * 1 / 10)  # warm-up: step 1 of 10
    assert learning_rate(cfg, 1, 4, 5) == pytest.approx(base)  # its last step reaches the base
    assert learning_rate(cfg, 2, 0, 5) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 2 / 10)))
    assert learning_rate(cfg, 5, 3, 5) == pytest.approx(base * 0.5)  # cosine: constant within an epoch
    assert learning_rate(cfg, 9, 0, 5) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    step = make_config("fmnist-tiny", ["optim.lr=0.03", "optim.lr_batch=256", "optim.batch_size=256",
                                       "optim.epochs=200", "optim.schedule=step", "optim.milestones=[120, 160]"])
    assert [learning_rate(step, e, 0, 100) for e in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])


def test_training_steps_use_the_schedule(tmp_path):
    """The learning rate each logged step trained with is the schedule's (cosine over 2 epochs: the
    base, then half of it), not a constant."""
    from harness.run.config import make_config
    from harness.training.pretrain import learning_rate

    assert run_train(tmp_path, "optim.lr=0.12").returncode == 0
    cfg = make_config("fmnist-tiny", [*SMALL, "optim.lr=0.12"])
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 16
    for r in steps:
        assert r["lr"] == pytest.approx(learning_rate(cfg, r["epoch"], (r["step"] - 1) % 8, 8))
    assert steps[0]["lr"] == pytest.approx(2 * steps[-1]["lr"])
