"""What a GPU node or a DDP job does that a single CPU process does not, each shown on CPU:
two real gloo processes with a short process-group timeout (a hang fails in seconds), loading as a
non-CPU device would, image folders made of real Fashion-MNIST images."""
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from image_folders import fmnist_folder
from ranks import run_ranks
from timing import scaled

from harness.run import runio
from harness.run.config import identity_digest, make_config
from harness.run.errors import ConfigError
from harness.training import checkpoint as ckpt

# The process group's timeout in these tests: a collective left waiting fails within it. Set against
# the machine's work (a rank slowed by the others must not trip it): 4 s on the reference machine.
TIMEOUT_S = round(scaled(4))
DDP = ["model.tiny_widths=[8,16,32]", "data.train_subset=512", "data.test_subset=256", "optim.batch_size=64", "optim.epochs=3",
       "moco.queue_size=256", "moco.bn_splits=4", "runtime.log_every=1", "runtime.threads=1",
       "eval.knn_every=1", "eval.knn_train_subset=256", "eval.knn_test_subset=128", "eval.probe=none",
       "eval.pixel_floor=false", f"runtime.dist_timeout_s={TIMEOUT_S}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, world, port, run_dir, overrides, env, prune_after, results):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env.get(rank, {})})
    from harness.training.pretrain import train

    cfg = make_config("fmnist-tiny", overrides)
    # As TrialJob: only rank 0 has the pruning reporter.
    on_epoch = (lambda epoch, record: epoch >= prune_after) if prune_after and rank == 0 else None
    results[rank] = train(cfg, Path(run_dir), on_epoch=on_epoch)


def ddp_train(run_dir: Path, *extra: str, env: dict | None = None, prune_after: int = 0, world: int = 2) -> dict:
    """`harness.training.pretrain.train` in `world` gloo processes, as a DDP trial job runs it; each rank's result."""
    results = mp.Manager().dict()
    run_ranks(_ddp_rank, (world, _free_port(), str(run_dir), [*DDP, *extra], env or {}, prune_after, results), world)
    return dict(results)


# ---------------------------------------------------------------- 1. resume on a GPU

def test_resume_restores_a_checkpoint_for_a_run_on_a_non_cpu_device(tmp_path):
    """The run's device must not be where a checkpoint is loaded to: RNG states have to stay CPU
    tensors. Shown with the meta device standing in for a GPU (the model goes there, its state loads)."""
    import dataclasses

    from harness.training.pretrain import PretrainRun, train
    from harness.training.runtime import Runtime

    cfg = make_config("fmnist-tiny", [*DDP[:6], "optim.epochs=1", "eval.knn_every=0", "eval.probe=none"])
    train(cfg, tmp_path)
    saved = ckpt.load_latest(tmp_path / "checkpoints")
    run = PretrainRun(cfg, tmp_path, Runtime.for_config(cfg), 0, 1)
    run.rt = dataclasses.replace(run.rt, device=torch.device("meta"))
    run.model.to("meta")
    torch.manual_seed(12345)
    run.resume(required=True)
    assert run.state.global_step == saved["global_step"] and run.resumed
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])  # the saved state, not the one before


# ---------------------------------------------------------------- 2. the final probe in a DDP trial

@pytest.mark.slow
def test_ddp_final_probe_longer_than_the_group_timeout_does_not_fail_the_other_ranks(tmp_path):
    """Rank 0 probes alone; the others must not wait for it in a collective (they did, in a barrier,
    and NCCL's watchdog aborted them after 10 minutes). The probe here takes 2x the group's timeout."""
    results = ddp_train(tmp_path, "eval.probe=fast", "optim.epochs=1", "eval.knn_every=0",
                        env={0: {"HARNESS_FAULT": f"stall-probe@{2 * TIMEOUT_S}"}})
    assert results[0]["status"] == results[1]["status"] == "completed"
    assert "probe" in results[0] and runio.read_status(tmp_path)["status"] == "completed"


# ---------------------------------------------------------------- 3. stop decisions taken once

@pytest.mark.slow
def test_ddp_ranks_stop_together_when_rank_0_is_told_to_prune(tmp_path):
    results = ddp_train(tmp_path, prune_after=1)
    assert [results[r]["status"] for r in (0, 1)] == ["pruned", "pruned"]
    assert results[0]["epoch"] == results[1]["epoch"] == 1


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_rank_alone_diverges(tmp_path):
    """A NaN on rank 1 only (injected at step 3): the loss is averaged over ranks before its check,
    so both ranks stop at that step (rank 1 alone used to stop, and rank 0 waited in its next step)."""
    results = ddp_train(tmp_path, env={1: {"HARNESS_FAULT": "nan-loss@3"}})
    assert [results[r]["status"] for r in (0, 1)] == ["diverged", "diverged"]
    assert results[0]["global_step"] == results[1]["global_step"] == 3


def test_the_logged_loss_of_a_ddp_run_is_the_mean_over_ranks(tmp_path):
    """The same mechanism seen from the metrics: world size 2 logs one loss per step, the ranks' mean,
    and the kNN monitor's value (computed by both ranks) is in every epoch record."""
    ddp_train(tmp_path, "optim.epochs=1")
    steps = [r for r in runio.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    epochs = [r for r in runio.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert len(epochs) == 1 and 0 < epochs[0]["knn_top1"] <= 1


# ---------------------------------------------------------------- 4. the kNN monitor on image folders

def _image_folder(root: Path, per_split: dict[str, int]) -> Path:
    """The ImageNet layout with real Fashion-MNIST images of 3 classes, as lossless PNGs."""
    return fmnist_folder(root, per_split, suffix=".png", pool=(600, 300))


FOLDER = ["data.dataset=imagefolder", "data.image_size=32", "data.num_workers=0", "optim.batch_size=32",
          "optim.epochs=1", "moco.queue_size=128", "moco.shuffle_bn=split", "moco.bn_splits=4", "eval.knn_every=1",
          "eval.knn_train_subset=96", "eval.knn_test_subset=40", "eval.knn_k=20", "eval.probe=none",
          "runtime.threads=1", f"runtime.dist_timeout_s={TIMEOUT_S}"]


def _knn_rank(rank, world, port, root, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    from harness.model import distributed
    from harness.model.moco import build_moco
    from harness.training.pretrain import knn_monitor

    torch.set_num_threads(1)
    distributed.init_from_env("cpu", TIMEOUT_S)
    cfg = make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}", "model.arch=resnet_tiny",
                                          "model.stem=cifar", "moco.mlp=false", "runtime.device=cpu"])
    torch.manual_seed(0)
    encoder = build_moco(cfg).encoder_q
    results[rank] = knn_monitor(cfg, encoder, None, torch.device("cpu"), rank, world)
    distributed.release()


def test_knn_monitor_on_an_image_folder_gives_one_value_on_1_and_2_processes(tmp_path):
    """Each rank extracts its share of the seeded subsets (96 train, 40 val of 120 and 60 images), the
    features are gathered, and every rank gets the value one process computes."""
    root = _image_folder(tmp_path / "data", {"train": 120, "val": 60})
    values = {}
    for world in (1, 2):
        results = mp.Manager().dict()
        run_ranks(_knn_rank, (world, _free_port(), str(root), results), world)
        values[world] = dict(results)
    one = values[1][0]
    assert 0 < one <= 1
    assert values[2][0] == values[2][1]
    assert abs(values[2][0] - one) <= 1 / 40 + 1e-9  # features of a batch of other size: one image at most


@pytest.mark.slow
def test_an_image_folder_run_logs_its_knn_monitor(tmp_path):
    """`harness.train` on an image folder with eval.knn_every=1 logged knn_top1: null before."""
    from harness.training.pretrain import train

    root = _image_folder(tmp_path / "data", {"train": 120, "val": 60})
    cfg = make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}", "model.arch=resnet_tiny", "model.stem=cifar",
                                          "moco.mlp=false", "runtime.device=cpu"])
    result = train(cfg, tmp_path / "run", probe=False)
    epochs = [r for r in runio.read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert result["status"] == "completed" and 0 < epochs[-1]["knn_top1"] <= 1
    assert result["knn_top1"] == epochs[-1]["knn_top1"]


def test_estimate_counts_an_image_folders_steps_and_gpu_hours_count_the_probe(tmp_path):
    from harness.planning.estimate import steps_per_epoch
    from harness.run.trial_result import read_trial_result

    root = _image_folder(tmp_path / "data", {"train": 120, "val": 30})
    cfg = make_config("imagenet-r50-v2", [*FOLDER, f"data.root={root}"])
    assert steps_per_epoch(cfg) == 120 // 32  # was 1 for any folder: ~5000x too few steps for ImageNet
    run = tmp_path / "run"
    run.mkdir()
    runio.append_jsonl(run / "metrics.jsonl", {"kind": "epoch", "epoch": 1, "epoch_seconds": 1800.0})
    runio.write_json(run / "probe.json", {"top1": 0.5, "top5": 0.9, "protocol": "standard", "seconds": 3600.0})
    runio.write_status(run, "completed", epoch=1)
    assert read_trial_result(run, "probe_top1", gpus=8).attrs["gpu_hours"] == pytest.approx(8 * 1.5)


# ---------------------------------------------------------------- 5. workers and several GPUs a trial

def _gpu_study(tmp_path: Path, resources: dict) -> Path:
    data = yaml.safe_load(Path("studies/smoke.yaml").read_text())
    data["resources"] = {**data["resources"], **resources}
    path = tmp_path / "gpu_study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_worker_mode_refuses_a_multi_gpu_trial_before_anything_is_submitted(tmp_path, study_cli):
    study = _gpu_study(tmp_path, {"gpus": 2})
    proc = study_cli(tmp_path / "res", str(study), "--executor", "local", "--workers", "2")
    assert proc.returncode == 2 and "--workers runs one process per trial" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "res").exists()  # nothing submitted, no study directory made


def test_local_executor_gives_each_parallel_trial_its_own_gpus_or_says_what_is_missing(tmp_path, study_cli):
    from harness.execution.executors import gpu_slots
    from harness.planning.studyfile import StudyError

    assert gpu_slots(2, 2, [0, 1, 2, 3]) == [(0, 1), (2, 3)]
    assert gpu_slots(1, 3, [4, 6, 7]) == [(4,), (6,), (7,)]
    with pytest.raises(StudyError, match="lower --parallel to 1"):
        gpu_slots(2, 2, [0, 1, 2])
    proc = study_cli(tmp_path / "res", str(_gpu_study(tmp_path, {"gpus": 1})), "--executor", "local",
                     env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "this machine shows 0" in proc.stderr and "--executor slurm" in proc.stderr and "Traceback" not in proc.stderr


def test_the_local_executor_sets_each_jobs_visible_gpus(tmp_path):
    """Two jobs at once of 1 GPU each see different devices (submitit's visible_gpus): read inside the jobs."""
    from harness.execution.executors import LocalExecutor
    from harness.planning.studyfile import Resources

    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    try:
        executor = LocalExecutor(tmp_path, Resources(gpus=1, cpus=1, time_min=2), "gpus", parallel=2)
        jobs = executor.submit([_visible, _visible], tmp_path)
        seen = sorted(job.result().strip() for job in jobs)
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert seen == ["0", "1"]


# What the job's own environment says (a stdlib callable: the job needs no test module to unpickle it).
# Alive for 5 s, so that the second job is submitted while the first still holds its GPU.
_visible = functools.partial(subprocess.check_output, ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES; sleep 5"], text=True)


# ---------------------------------------------------------------- device and precision before identity

def test_device_and_precision_are_resolved_before_identity_so_cpu_and_gpu_runs_never_share(tmp_path):
    from harness.planning import shared

    cpu, gpu = make_config("fmnist-tiny", gpus=0), make_config("fmnist-tiny", ["runtime.device=auto"], gpus=1)
    assert (cpu.runtime.device, cpu.runtime.precision) == ("cpu", "fp32")
    assert (gpu.runtime.device, gpu.runtime.precision) == ("cuda", "bf16")
    assert cpu.digest() != gpu.digest()
    # A finished CPU run is not found for the GPU point, and is for the CPU one.
    run = tmp_path / "results" / "other" / "runs" / "a"
    run.mkdir(parents=True)
    runio.write_json(run / "identity.json", {"digest": cpu.digest(), "identity": cpu.identity()})
    (run / "config.yaml").write_text(yaml.safe_dump(cpu.to_dict()))
    runio.write_status(run, "completed", epoch=1)
    index = shared.RunIndex(tmp_path / "results")
    assert index.find(cpu.digest()) == run and index.find(gpu.digest()) is None
    # Configs written before resolution said auto: all of them were CPU fp32 runs, and keep that identity.
    legacy = cpu.to_dict()
    legacy["runtime"].update(device="auto", precision="auto")
    assert identity_digest(legacy) == cpu.digest()


def test_a_gpu_job_that_sees_no_gpu_fails_at_once_naming_the_node(tmp_path):
    from harness.training.pretrain import train

    cfg = make_config("fmnist-tiny", [*DDP, "runtime.device=auto"], gpus=1)  # a trial given a GPU
    with pytest.raises(ConfigError, match=f"node {socket.gethostname()} shows none"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # before anything was written


def test_evaluation_reads_features_in_a_precision_the_gpu_has(monkeypatch):
    """kNN and probes ran under bf16 autocast on every CUDA device; a T4 or V100 has no bf16 (refused
    or emulated): fp16 there, bf16 from Ampere on, fp32 on a CPU."""
    from harness.training.runtime import inference_dtype

    cuda = torch.device("cuda", 0)
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, supported=supported, **k: supported)
        assert inference_dtype(cuda) == dtype
    assert inference_dtype(torch.device("cpu")) == torch.float32


def test_fp16_is_refused_on_a_cpu_and_a_resume_under_another_precision_is_refused(tmp_path):
    from harness.training.pretrain import train

    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        make_config("fmnist-tiny", ["runtime.precision=fp16"], gpus=0)
    small = [*DDP[:6], "optim.epochs=1", "eval.knn_every=0"]
    train(make_config("fmnist-tiny", small, gpus=0), tmp_path)
    with pytest.raises(ConfigError, match="runtime.precision"):
        train(make_config("fmnist-tiny", [*small, "runtime.precision=bf16"], gpus=0), tmp_path)


# ---------------------------------------------------------------- numerics and layout

def test_infonce_similarities_are_fp32_under_bf16_autocast():
    from harness.model.moco import MoCo

    torch.manual_seed(0)
    model = MoCo(lambda: torch.nn.Linear(8, 16), dim=16, queue_size=4096, temperature=0.07)
    q = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    k = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    reference_loss, reference = model._infonce(q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = model._infonce(q, k)
    # Computed in bf16, a logit at T = 0.07 moves by up to ~0.06 (measured here: 0.05 when autocast decides).
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, reference, atol=1e-5) and torch.allclose(loss, reference_loss, atol=1e-6)


def _gather_rank(rank, world, port, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    from harness.model import distributed

    distributed.init_from_env("cpu", TIMEOUT_S)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) + 1000 * rank
    gathered = distributed.concat_all_gather(x.contiguous(memory_format=torch.channels_last))
    rows = distributed.gather_rows(torch.full((rank + 1, 2), float(rank)))  # ranks with 1 and 2 rows
    results[rank] = (gathered, rows)
    distributed.release()


def test_gathers_of_channels_last_and_uneven_tensors_equal_their_inputs():
    results = mp.Manager().dict()
    run_ranks(_gather_rank, (2, _free_port(), results), 2)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    for rank in (0, 1):
        gathered, rows = results[rank]
        assert torch.equal(gathered, torch.cat([x, x + 1000]))
        assert torch.equal(rows, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))



def _empty_shard_rank(rank, world, port, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    from harness.data.datasets import load_tensors
    from harness.model import distributed
    from harness.model.moco import build_moco
    from harness.training.features import extract_split

    distributed.init_from_env("cpu", TIMEOUT_S)
    cfg = make_config("fmnist-tiny", [*DDP[:3], "eval.knn_test_subset=1"])
    torch.manual_seed(0)
    backbone = build_moco(cfg).encoder_q.backbone
    feats, labels = extract_split(backbone, cfg, "test", torch.device("cpu"), load_tensors(cfg), limit=1,
                                  rank=rank, world=world)
    results[rank] = (feats.shape, labels.tolist())
    distributed.release()


def test_a_rank_with_an_empty_evaluation_shard_still_gathers_and_nothing_hangs():
    """A 1-image kNN subset on 2 ranks: rank 1's shard is empty; it must send zero rows of the right
    width (it crashed in torch.cat([]) and left rank 0 waiting in the gather until the timeout)."""
    results = mp.Manager().dict()
    run_ranks(_empty_shard_rank, (2, _free_port(), results), 2)
    assert results[0] == results[1] and results[0][0][0] == 1 and len(results[0][1]) == 1

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
