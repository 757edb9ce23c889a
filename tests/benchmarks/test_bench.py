"""`python -m harness.bench`: the prepared device check, run here at its small size (the same code a
lent GPU runs at full size, and as a person runs it: a command of its own), which also shows every
recipe benchmarks on synthetic images. The other parts run the face's main in this process."""
import json
import subprocess
import sys
from pathlib import Path

from timing import hang_s

ROOT = Path(__file__).resolve().parents[2]


def test_the_device_check_runs_every_part_at_small_size(tmp_path):
    cmd = [sys.executable, "-m", "harness.bench", "device", "--size", "small", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=hang_s(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = tmp_path.glob("bench-device-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert [r["check"] for r in rows] == [
        "fp32 eager", "bf16 autocast", "channels_last", "torch.compile",
        "throughput batched", "throughput per_image", "throughput batched", "throughput per_image",
        "packing 1", "packing 2", "input per_image", "input batched", "input device_decode", "input speedup",
        "input device_decode vs batched", "resume on the device", "gather channels_last", "syncs per step",
        "layout channels_last=no cudnn.benchmark=False", "layout channels_last=no cudnn.benchmark=True",
        "layout channels_last=yes cudnn.benchmark=False", "layout channels_last=yes cudnn.benchmark=True",
        "decode stream order", "logits bf16 vs fp32", "summary"]
    gpu = {r["check"]: r for r in rows if r["part"] == "gpu"}
    # The checks that settle the GPU paths ran on the CPU too: resume exact, gathers equal, fp32 logits.
    assert gpu["resume on the device"]["ok"] and gpu["resume on the device"]["state_max_diff"] == 0
    assert 0 < gpu["resume on the device"]["resumed_at_step"] < gpu["resume on the device"]["steps"]
    assert gpu["gather channels_last"]["ok"] and gpu["gather channels_last"]["world_size"] == 2
    assert gpu["logits bf16 vs fp32"]["ok"]
    assert gpu["decode stream order"]["not_checked"].startswith("no CUDA") and "ok" not in gpu["decode stream order"]
    syncs = gpu["syncs per step"]  # counted over the real pipeline, batches drawn inside the count
    assert syncs["ok"] and syncs["syncs_per_step"] == 0 and syncs["blocking_moves_per_step"] == 0
    assert gpu["logits bf16 vs fp32"]["bf16_einsum_max_diff"] > 10 * gpu["logits bf16 vs fp32"]["model_max_diff"]
    # the fast paths train like fp32 eager: same batches, same start, losses and queue within tolerance
    fast = [r for r in rows if "ok" in r and r["part"] == "device"]
    assert len(fast) == 3 and all(r["ok"] for r in fast), fast
    assert all(len(r["losses"]) == 3 for r in rows[:4])
    # imagenet-r50-v2 (an image-folder recipe) ran on synthetic images through both data paths
    throughput = [r for r in rows if r["check"].startswith("throughput")]
    assert [r["recipe"] for r in throughput] == ["cifar10-r18"] * 2 + ["imagenet-r50-v2"] * 2
    assert all(r["images_per_s"] > 0 and r["achieved_tflops"] > 0 for r in throughput)
    assert all(r["ops_per_step"] > 0 and r["syncs_per_step"] == 0 for r in throughput if r["path"] == "batched")
    assert throughput[2]["arch"] == "resnet50"
    packing = [r for r in rows if r["check"].startswith("packing")]
    assert [r["processes"] for r in packing] == [1, 2]  # and 4 at full size
    assert all(len(r["per_process_images_per_s"]) == r["processes"] and r["aggregate_images_per_s"] > 0
               for r in packing)
    inputs = {r["check"]: r for r in rows if r["check"].startswith("input")}
    assert inputs["input device_decode vs batched"]["ok"] and inputs["input batched"]["device_images_per_s"] > 0
    assert "| torch.compile | cifar10-r18 | ok: loss rel. diff" in proc.stdout  # the table a person reads
    assert "| decode stream order |" in proc.stdout and "not checked: no CUDA" in proc.stdout


def test_the_diagnostics_bench_times_them_against_an_epoch(tmp_path, harness_cli):
    """`python -m harness.bench diagnostics`: both subsets, every sampled age present (the queue filled
    first), a cost that is a fraction of the epoch (no figure asserted: speed is the bench's, not a test's)."""
    proc = harness_cli("bench", "diagnostics", "--out", str(tmp_path), "--repeats", "1",
                       "--set", "data.train_subset=1024", "--set", "optim.batch_size=64", "--set", "moco.queue_size=256",
                       "--set", "moco.bn_splits=4", "--set", "runtime.threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = tmp_path.glob("bench-diagnostics-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert [r["subset"] for r in rows] == [128, 256]
    assert all(r["ages"] == [1, 2, 4] and 0 < r["fraction_of_epoch"] < 1 and r["steps_per_epoch"] == 16 for r in rows)


def test_the_data_bench_times_old_and_new_folder_pipelines_side_by_side(tmp_path, harness_cli):
    """`bench data` on an image-folder recipe (it died with KeyError: 'imagefolder'): photo-like JPEGs
    written for it, each path's loader images/s per core and the device side's images/s in one JSON."""
    proc = harness_cli("bench", "data", "--recipe", "imagenet-r50-v2", "--synthetic-jpeg", "24",
                       "--set", "optim.batch_size=8", "--set", "data.image_size=64", "--set", "runtime.device=cpu",
                       "--steps", "1", "--repeats", "1", "--warmup", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = tmp_path.glob("bench-data-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert [r["path"] for r in rows] == ["per_image", "batched", "device_decode", "speedup"]
    assert all(r["loader_images_per_s_per_core"] > 0 for r in rows[:3])
    assert all(r["device_images_per_s"] > 0 for r in rows[1:3]) and "device_images_per_s" not in rows[0]
    speedup = rows[3]
    assert speedup["batched_over_per_image"] == rows[1]["loader_images_per_s_per_core"] / rows[0]["loader_images_per_s_per_core"]
    assert speedup["synthetic_jpeg"]["images"] == 24 and speedup["synthetic_jpeg"]["size"] == [500, 375]


def test_the_device_checks_resume_row_says_not_checked_when_no_checkpoint_was_written(monkeypatch):
    """Without a checkpoint the "resumed" run starts afresh and matches trivially: not an "ok"."""
    from harness.benchmarks import gpu_checks
    from harness.benchmarks.sizes import device_size
    from harness.training import checkpoint

    monkeypatch.setattr(checkpoint, "save", lambda *args, **kwargs: None)
    row = gpu_checks.check_resume(device_size("small"))
    assert row["ok"] is None and "no checkpoint" in row["not_checked"]
    assert gpu_checks.describe(row).startswith("not checked: ")


def test_the_device_checks_sync_row_counts_a_sync_added_to_the_augmentation(monkeypatch):
    from harness.benchmarks import gpu_checks
    from harness.benchmarks.sizes import device_size
    from harness.data import augment

    apply_colour = augment.BatchAugment.apply_colour

    def with_a_sync(self, x, table):
        float(x.mean())  # a read-back, as a stray .item() would be
        return apply_colour(self, x, table)

    monkeypatch.setattr(augment.BatchAugment, "apply_colour", with_a_sync)
    row = gpu_checks.check_syncs(device_size("small"))
    assert row["syncs_per_step"] >= 2 and row["ok"] is False  # two views a step


def test_bench_census_counts_a_step(tmp_path, harness_cli):
    proc = harness_cli("bench", "census", "--set", "optim.batch_size=64", "--set", "moco.queue_size=256",
                       "--set", "runtime.device=cpu", "--set", "model.tiny_widths=[8,16,32]", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(next(tmp_path.glob("bench-census-*.json")).read_text())["rows"]
    assert row["ops_per_step"] > 100 and row["syncs_per_step"] == 0 and row["blocking_moves_per_step"] == 0


def test_the_batch_signature_bench_measures_how_keys_depend_on_their_batch(tmp_path):
    """A tiny trained run: a key encoded in two random batches differs (train-mode BatchNorm), and
    more in batches of 32 than of 128 (noisier batch statistics)."""
    from harness.benchmarks.options import BenchOptions
    from harness.benchmarks.parts import bench_batch_signature
    from harness.run.config import make_config
    from harness.training.pretrain import train

    cfg = make_config("fmnist-tiny", ["model.tiny_widths=[8,16,32]", "data.train_subset=512", "data.test_subset=64",
                                      "optim.batch_size=128", "optim.epochs=1", "moco.queue_size=256",
                                      "moco.shuffle_bn=none", "eval.knn_every=0", "eval.probe=none",
                                      "runtime.threads=1"])
    train(cfg, tmp_path / "run", probe=False)
    rows = {r["batch"]: r["key_change"] for r in bench_batch_signature(BenchOptions(run=str(tmp_path / "run")))}
    assert sorted(rows) == [32, 128]
    assert rows[32] > rows[128] > 0


def test_the_monitor_and_walltime_benches_read_finished_runs(tmp_path, harness_cli):
    """bench monitor: the kNN monitor's estimate on seeded banks against the whole training split's, its
    cost against a timed epoch, and whether banks order two runs as the whole split does; bench
    walltime: each run's pretraining wall time against its training seconds, from its own files."""
    from harness.run.config import make_config
    from harness.training.pretrain import train

    tiny = ["model.tiny_widths=[8,16,32]", "data.train_subset=600", "data.test_subset=256", "optim.batch_size=64",
            "optim.epochs=2", "moco.queue_size=256", "moco.bn_splits=4", "eval.pixel_floor=false",
            "eval.knn_test_subset=256", "eval.knn_every=2", "eval.probe=fast"]
    runs = [tmp_path / f"m{m}" for m in (0.9, 0.99)]
    for run, m in zip(runs, (0.9, 0.99)):
        train(make_config("fmnist-tiny", [*tiny, f"moco.momentum={m}"]), run)
    out = tmp_path / "bench"
    proc = harness_cli("bench", "monitor", "walltime", "--run", ",".join(map(str, runs)), "--steps", "2", "--warmup", "1",
                       "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(out.glob("bench-*.json")).read_text())["rows"]
    monitor = [r for r in rows if r["part"] == "monitor" and "run" in r]
    assert sorted({r["bank"] for r in monitor}) == [500, 600]  # the banks smaller than the split, and the split
    whole = [r for r in monitor if r["bank"] == 600]
    assert all(r["sd_points"] == 0 and r["minus_whole_points"] == 0 for r in whole)
    assert all(r["monitor_s"] > 0 and r["fraction_of_epoch"] == r["monitor_s"] / r["epoch_s"] for r in monitor)
    pairs = [r for r in rows if r["part"] == "monitor" and "pair" in r]
    assert {r["same_order"] for r in pairs if r["bank"] == 500} <= {f"{k}/5" for k in range(6)}
    wall = {r["run"]: r for r in rows if r["part"] == "walltime"}
    for run in runs:
        row = wall[run.name]
        assert row["attempts"] == 1 and row["epochs"] == 2 and row["monitor_epochs"] == 1  # every 2nd epoch
        assert row["pretraining_wall_s"] > row["training_s"] > 0 and row["probe_s"] > 0
