"""One MoCo pretraining run: `python -m harness.train --recipe R [--set k=v ...] [--out DIR] [--resume]`.

The run directory is the whole interface to the rest of the harness:
  config.yaml     the resolved configuration
  metrics.jsonl   one JSON object per epoch (and per logged step)
  checkpoints/    atomic checkpoints; the newest good one is resumed automatically
  status.json     running | completed | diverged | pruned, with the final figures
  probe.json      the linear-probe result (harness.probe)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_mod
from . import faults, runio
from .config import ConfigError, RunConfig, dump_yaml, make_config, validate
from .data import NUM_CLASSES, check_dataset, load_tensors, pretrain_views, seeded_generator
from .features import encoder_features, extract, split_batches
from .knn import knn_accuracy
from .moco import build_moco, compile_encoders
from .probe import probe_run  # imported up front: a long run must not load newer code at its end

EpochCallback = Callable[[int, dict], Optional[str]]  # returns "prune" to stop the run


def pick_device(cfg: RunConfig, local_rank: int = 0) -> torch.device:
    want = cfg.runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for but no GPU is visible; use runtime.device=cpu.")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def learning_rate(cfg: RunConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Linear warm-up per step, then cosine or step decay per epoch (as the official code)."""
    o, base = cfg.optim, cfg.scaled_lr()
    if epoch < o.warmup_epochs:
        return base * (epoch * steps_per_epoch + step_in_epoch + 1) / (o.warmup_epochs * steps_per_epoch)
    if o.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / o.epochs))
    return base * 0.1 ** sum(epoch >= m for m in o.milestones)


class Progress:
    """A progress bar on a terminal, plain log lines otherwise (SLURM logs stay readable)."""

    def __init__(self, enabled: bool, total: int, every: int):
        self.every, self.bar = every, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.enabled = enabled

    def advance(self, done: int, text: str | None) -> None:
        if self.bar is not None:
            self.bar.n = done
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        elif self.enabled and text:
            print(f"[train] step {done}: {text}", flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(f"[train] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def knn_monitor(cfg: RunConfig, encoder: nn.Module, splits, device) -> float:
    e = cfg.eval
    model = encoder_features(encoder, e.knn_features)
    bank, bank_labels = extract(model, split_batches(cfg, "train", device, splits, e.knn_train_subset), device)
    test, test_labels = extract(model, split_batches(cfg, "test", device, splits, e.knn_test_subset), device)
    classes = NUM_CLASSES.get(cfg.data.dataset) or int(bank_labels.max()) + 1
    return knn_accuracy(bank, bank_labels, test, test_labels, classes, e.knn_k, e.knn_t)


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, is_main: bool) -> None:
    saved = run_dir / "config.yaml"
    if saved.exists():
        import yaml

        old = yaml.safe_load(saved.read_text())
        new = cfg.to_dict()
        changed = [f"{s}.{k}" for s in new if isinstance(new[s], dict)
                   for k in new[s] if (old.get(s) or {}).get(k) != new[s][k]]
        changed += [k for k in new if not isinstance(new[k], dict) and old.get(k) != new[k]]
        if changed:
            raise ConfigError(f"--out {run_dir}: this directory holds a run with a different config "
                              f"({', '.join(changed[:6])}); resuming it would mix two runs. "
                              f"Use another --out directory.")
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runio.write_atomic(saved, dump_yaml(cfg))


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, on_epoch: EpochCallback | None = None,
          probe: bool = True) -> dict:
    """Pretrain (resuming from the newest good checkpoint), then probe. Returns the final status."""
    run_dir = Path(run_dir)
    device_type = "cuda" if cfg.runtime.device != "cpu" and torch.cuda.is_available() else "cpu"
    rank, world, local_rank = dist_mod.init_from_env(device_type)
    validate(cfg, world_size=world)
    is_main = rank == 0
    device = pick_device(cfg, local_rank)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    cuda = device.type == "cuda"
    bf16 = cfg.runtime.precision == "bf16" or (cfg.runtime.precision == "auto" and cuda)
    channels_last = cfg.runtime.channels_last == "yes" or (cfg.runtime.channels_last == "auto" and cuda)

    run_lock = runio.lock_run_dir(run_dir) if is_main else None  # held until the run returns
    _prepare_run_dir(cfg, run_dir, is_main)
    splits = None if cfg.data.dataset == "imagefolder" else load_tensors(cfg)
    views = pretrain_views(cfg, device, rank, world, splits)
    steps_per_epoch = views.steps_per_epoch

    torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every rank
    model = build_moco(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.runtime.compile:
        compile_encoders(model)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.scaled_lr(), momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, foreach=True)

    ckpt_dir = run_dir / "checkpoints"
    state = ckpt.load_latest(ckpt_dir, map_location=device)
    if resume and state is None:
        raise ConfigError(f"--resume: no usable checkpoint in {ckpt_dir}; drop --resume to start afresh.")
    epoch, start_step, global_step = 0, 0, 0
    sums = {"loss": 0.0, "accuracy": 0.0, "count": 0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        sums = state["sums"]
        ckpt.set_rng_state(state["rng"])
    if is_main:
        runio.truncate_metrics(run_dir / "metrics.jsonl", global_step)
        runio.write_status(run_dir, "running", epoch=epoch, global_step=global_step)
        if state is not None:
            print(f"[train] resumed from {state['path']} (epoch {epoch}, step {global_step})", flush=True)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)

    def save_checkpoint(next_epoch: int, next_step: int) -> None:
        if is_main:
            ckpt.save(ckpt_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": None,
                "epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step,
                "sums": dict(sums), "rng": ckpt.rng_state(), "config": cfg.to_dict(),
            }, keep=cfg.runtime.keep_checkpoints)
        if world > 1:
            torch.distributed.barrier()

    status, last = "completed", {}
    progress = Progress(is_main, cfg.optim.epochs * steps_per_epoch, cfg.runtime.log_every)
    progress.advance(global_step, None)
    while epoch < cfg.optim.epochs and status == "completed":
        tic, loss_acc, acc_acc, n_acc = time.perf_counter(), None, None, 0
        for step, (x_q, x_k) in enumerate(views.epoch(epoch, start_step), start=start_step):
            lr = learning_rate(cfg, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if channels_last:
                x_q, x_k = x_q.contiguous(memory_format=torch.channels_last), x_k.contiguous(
                    memory_format=torch.channels_last)
            # All randomness inside the step (Shuffle BN permutations) derives from (seed, step).
            torch.manual_seed(seeded_generator("step", cfg.runtime.seed, global_step, rank).initial_seed())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(x_q, x_k)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            global_step += 1
            # Accumulate on the device; read back only every log_every steps (no per-step sync).
            loss_acc = out["loss"].detach() if loss_acc is None else loss_acc + out["loss"].detach()
            acc_acc = out["accuracy"] if acc_acc is None else acc_acc + out["accuracy"]
            n_acc += 1
            last_of_epoch = step + 1 == steps_per_epoch
            if global_step % cfg.runtime.log_every == 0 or last_of_epoch:
                loss_val, acc_val = loss_acc.item(), acc_acc.item()
                sums["loss"] += loss_val
                sums["accuracy"] += acc_val
                sums["count"] += n_acc
                mean_loss = loss_val / n_acc
                loss_acc, acc_acc, n_acc = None, None, 0
                if is_main:
                    runio.append_metrics(run_dir, {"kind": "step", "epoch": epoch, "step": global_step,
                                                   "loss": mean_loss, "lr": lr})
                progress.advance(global_step, f"epoch {epoch + 1} loss {mean_loss:.4f} lr {lr:.4g}")
                if not math.isfinite(mean_loss):
                    status = "diverged"
                    progress.note(f"loss is {mean_loss} at step {global_step}: stopping (diverged)")
                    break
            every_steps = cfg.runtime.checkpoint_every_steps
            if every_steps and global_step % every_steps == 0 and not last_of_epoch:
                save_checkpoint(epoch, step + 1)
            faults.kill_point(f"after-step-{global_step}", run_dir)
        if status != "completed":
            break
        seconds = time.perf_counter() - tic
        record = {"kind": "epoch", "epoch": epoch + 1, "step": global_step,
                  "loss": sums["loss"] / max(sums["count"], 1), "pretext_acc": sums["accuracy"] / max(sums["count"], 1),
                  "lr": lr, "epoch_seconds": seconds,
                  "images_per_s": (steps_per_epoch - start_step) * cfg.optim.batch_size / seconds}
        knn_every = cfg.eval.knn_every
        if knn_every and ((epoch + 1) % knn_every == 0 or epoch + 1 == cfg.optim.epochs) and is_main and splits:
            record["knn_top1"] = knn_monitor(cfg, model.encoder_q, splits, device)
        sums = {"loss": 0.0, "accuracy": 0.0, "count": 0}
        epoch, start_step, last = epoch + 1, 0, record
        if is_main:
            runio.append_metrics(run_dir, record)
            runio.write_status(run_dir, "running", epoch=epoch, global_step=global_step)
            progress.note(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in record.items() if k != "kind"))
        if epoch % cfg.runtime.checkpoint_every == 0 or epoch == cfg.optim.epochs:
            save_checkpoint(epoch, 0)
        if on_epoch is not None and on_epoch(epoch, record) == "prune":
            status = "pruned"
    progress.close()

    result = {"status": status, "epoch": epoch, "global_step": global_step, "world_size": world,
              "loss": last.get("loss"), "knn_top1": last.get("knn_top1")}
    if is_main:
        if status == "completed" and probe and cfg.eval.probe != "none" and not (run_dir / "probe.json").exists():
            runio.write_status(run_dir, "running", epoch=epoch, global_step=global_step, stage="probe")
            result["probe"] = probe_run(cfg, run_dir, model.encoder_q, splits, device)
        runio.write_status(run_dir, status, **{k: v for k, v in result.items() if k != "status"})
    if world > 1:
        torch.distributed.barrier()
    if run_lock is not None:
        run_lock.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.train", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fmnist-tiny", help="a name in studies/recipes/ (default: fmnist-tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set moco.momentum=0.99 (repeatable)")
    parser.add_argument("--out", type=Path,
                        help="run directory (default: runs/<recipe> under $HARNESS_RESULTS, else under results/)")
    parser.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    parser.add_argument("--no-probe", action="store_true", help="skip the final linear probe")
    args = parser.parse_args(argv)
    try:
        cfg = make_config(args.recipe, args.overrides)
        check_dataset(cfg)
        run_dir = args.out or runio.RESULTS / "runs" / args.recipe
        runio.check_writable(run_dir)
        result = train(cfg, run_dir, resume=args.resume, probe=not args.no_probe)
    except (ConfigError, runio.RunDirBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0 if result["status"] in ("completed", "pruned") else 3


if __name__ == "__main__":
    sys.exit(main())
