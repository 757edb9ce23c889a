"""A run configuration's validation: each section's bounds and the rules that span fields (K a
multiple of the keys per step, the batch divisible by the processes, ...). Every error names the field
and the fix, and is raised before any training starts (make_config calls it; train again with the
process count)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from harness.run.errors import ConfigError
from harness.run.mechanisms import mechanism

if TYPE_CHECKING:  # the config's types, for annotations only: config.py imports this module
    from harness.run.config import EvalConfig, OptimConfig, RunConfig, RuntimeConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_crop_scale(key: str, value: list[float], usual: str) -> None:
    """A RandomResizedCrop area range: [low, high] with 0 < low <= high <= 1."""
    _require(len(value) == 2 and 0 < value[0] <= value[1] <= 1,
             f"{key}: expected [low, high] with 0 < low <= high <= 1 ({usual}), got {value}.")


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Every section's bounds and the rules that span fields. `world_size` is checked once it is known.

    Raises:
        ConfigError: the first field that cannot run, named, with its fix.
    """
    _validate_optim(cfg.optim)  # first: the queue's rule divides by the batch
    _validate_moco(cfg)
    _validate_data_model(cfg)
    _validate_eval(cfg.eval)
    _validate_runtime(cfg.runtime)
    if world_size is not None:
        _validate_world(cfg, world_size)


def _validate_moco(cfg: RunConfig) -> None:
    m, o = cfg.moco, cfg.optim
    _require(0.0 <= m.momentum <= 1.0,
             f"moco.momentum: m={m.momentum} is outside [0, 1]; the paper uses 0.999 (ImageNet) or 0.99 (CIFAR).")
    _require(m.temperature > 0,
             f"moco.temperature: tau={m.temperature} must be > 0; the paper uses 0.07 (v1) or 0.2 (v2).")
    _require(m.dim > 0, f"moco.dim: must be > 0 (the paper uses 128), got {m.dim}.")
    mech = mechanism(m.key_encoder)
    if mech.has_queue:
        keys_per_step = o.batch_size * (2 if m.symmetric else 1)
        _require(m.queue_size > 0, f"moco.queue_size: K must be > 0, got {m.queue_size}.")
        _require(m.queue_size % keys_per_step == 0,
                 f"moco.queue_size: K={m.queue_size} is not a multiple of the keys enqueued per step "
                 f"({keys_per_step} = optim.batch_size{' x 2 (symmetric)' if m.symmetric else ''}); "
                 f"the queue would wrap mid-batch. Use K={_nearest_multiple(m.queue_size, keys_per_step)} "
                 f"or change optim.batch_size.")
    else:
        # Negatives are the other keys of the batch, or K draws from the bank: no queue to wrap.
        _require(not m.symmetric, f"moco.symmetric: not defined for key_encoder={m.key_encoder}; "
                                  f"set moco.symmetric=false.")
    if mech.negatives == "bank":
        _require(m.queue_size > 0, f"moco.queue_size: K (negatives drawn from the bank) must be > 0, "
                                   f"got {m.queue_size}.")
        _require(0.0 <= m.bank_momentum < 1.0, f"moco.bank_momentum: must be in [0, 1) (InstDisc: 0.5), "
                                               f"got {m.bank_momentum}.")
    if m.shuffle_bn == "split":
        _require(m.bn_splits >= 1, f"moco.bn_splits: must be >= 1, got {m.bn_splits}.")


def _validate_optim(o: OptimConfig) -> None:
    _require(o.batch_size > 0, f"optim.batch_size: must be > 0, got {o.batch_size}.")
    _require(o.epochs > 0, f"optim.epochs: must be > 0, got {o.epochs}.")
    _require(o.lr > 0 and o.lr_batch > 0, "optim.lr and optim.lr_batch: must be > 0.")
    _require(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}.")
    _require(0 <= o.warmup_epochs < o.epochs,
             f"optim.warmup_epochs: must be in [0, optim.epochs), got {o.warmup_epochs}.")


def _validate_data_model(cfg: RunConfig) -> None:
    d = cfg.data
    _require_crop_scale("data.crop_scale", d.crop_scale, "MoCo: [0.2, 1]")
    _require(cfg.model.tiny_stem_stride in (1, 2),
             f"model.tiny_stem_stride: must be 1 or 2, got {cfg.model.tiny_stem_stride}.")
    _require(len(cfg.model.tiny_widths) > 0 and all(w > 0 for w in cfg.model.tiny_widths),
             f"model.tiny_widths: expected positive stage widths such as [32, 64, 128], "
             f"got {cfg.model.tiny_widths}.")
    _require(d.image_size >= 8, f"data.image_size: must be >= 8 pixels, got {d.image_size}.")
    _require(d.loader != "device_decode" or d.dataset == "imagefolder",
             f"data.loader: device_decode decodes image files; {d.dataset} is held in memory (use batched).")
    _require(d.num_workers >= 0, f"data.num_workers: must be >= 0 (0: load in the training process), "
                                 f"got {d.num_workers}.")
    for key in ("train_subset", "test_subset"):
        value = getattr(d, key)
        _require(value is None or value > 0, f"data.{key}: must be positive or null, got {value}.")


def _validate_eval(e: EvalConfig) -> None:
    _require(e.knn_k > 0 and e.knn_t > 0, "eval.knn_k and eval.knn_t: must be > 0 (InstDisc: k=200, t=0.1).")
    _require(e.knn_every >= 0, f"eval.knn_every: must be >= 0 epochs (0: never), got {e.knn_every}.")
    _require(e.probe_epochs > 0 and e.probe_batch_size > 0,
             "eval.probe_epochs and eval.probe_batch_size: must be > 0.")
    _require(e.probe_lr > 0, f"eval.probe_lr: must be > 0 (main_lincls uses 30), got {e.probe_lr}.")
    _require(e.probe_weight_decay >= 0,
             f"eval.probe_weight_decay: must be >= 0 (main_lincls uses 0), got {e.probe_weight_decay}.")
    _require_crop_scale("eval.probe_crop_scale", e.probe_crop_scale, "main_lincls: [0.08, 1]")


def _validate_runtime(r: RuntimeConfig) -> None:
    _require(r.threads >= 0, f"runtime.threads: must be >= 0 (0: torch's default), got {r.threads}.")
    _require(r.log_every >= 1, f"runtime.log_every: must be >= 1 step, got {r.log_every}.")
    _require(r.checkpoint_every >= 1,
             f"runtime.checkpoint_every: must be >= 1 epoch (the last epoch is always saved), got {r.checkpoint_every}.")
    _require(r.checkpoint_every_steps >= 0,
             f"runtime.checkpoint_every_steps: must be >= 0 (0: at epoch ends only), got {r.checkpoint_every_steps}.")
    _require(r.keep_checkpoints >= 1, f"runtime.keep_checkpoints: must be >= 1, got {r.keep_checkpoints}.")
    _require(all(isinstance(e, int) and e >= 1 for e in r.keep_epochs),
             f"runtime.keep_epochs: epochs (>= 1) whose checkpoints are kept, got {r.keep_epochs}.")
    _require(r.dist_timeout_s > 0, f"runtime.dist_timeout_s: must be > 0 seconds, got {r.dist_timeout_s}.")


def _validate_world(cfg: RunConfig, world_size: int) -> None:
    m, o = cfg.moco, cfg.optim
    _require(o.batch_size % world_size == 0,
             f"optim.batch_size: {o.batch_size} is not divisible by the {world_size} processes.")
    per_rank = o.batch_size // world_size
    if m.shuffle_bn == "split":
        _require(per_rank % m.bn_splits == 0,
                 f"moco.bn_splits: the per-process batch {per_rank} is not divisible by bn_splits={m.bn_splits}.")
    if m.shuffle_bn == "ddp":
        _require(world_size > 1,
                 "moco.shuffle_bn: 'ddp' shuffles keys across processes but this run has one process; "
                 "use moco.shuffle_bn=split (SplitBatchNorm, as the CIFAR Colab) on a single device.")


def _nearest_multiple(k: int, b: int) -> int:
    return max(b, round(k / b) * b)
