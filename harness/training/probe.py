"""Linear probes on a frozen backbone: `python -m harness.probe RUN_DIR --protocol fast|standard`.

* standard: the paper's protocol (main_lincls): backbone frozen in eval mode, fc ~ N(0, 0.01) with
  zero bias, SGD lr 30, momentum 0.9, wd 0, step x0.1 at 60 % and 80 % of the epochs, train views
  RandomResizedCrop + flip, test centre view; best and last top-1/top-5. Small-image recipes scale
  it with eval.probe_crop_scale / probe_epochs / probe_lr / probe_weight_decay and may standardise
  the features first (eval.probe_feature_bn, the MAE probe's BatchNorm without affine).
* fast: features extracted once (no augmentation) and cached on the device; multinomial logistic
  regression by full-batch L-BFGS; its L2 strength is chosen on a held-out 20 % of the TRAINING
  split, then refit on the whole training split and evaluated once on the test split.

Both write their result with the settings that made it (harness.run.evaluations.result_path: probe.json),
and a raw-pixel floor: the fast probe on pixels, cached per dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.data.augment import RECIPES, BatchAugment
from harness.data.datasets import NORMALIZATION, NUM_CLASSES, folder_classes, folder_probe_loader, folder_probe_set, load_tensors, seeded_generator
from harness.run import evaluations, faults, runio
from harness.run.config import RunConfig, config_from_dict
from harness.run.errors import HarnessError
from harness.training import checkpoint as ckpt
from harness.training.features import extract, split_batches
from harness.training.runtime import inference_autocast, inference_dtype

FAST_L2_GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


class ProbeError(HarnessError, RuntimeError):
    """A run that cannot be probed (no checkpoint, a config this code cannot read)."""


# ---------------------------------------------------------------- fast protocol

def _topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iters: int = 100) -> nn.Linear:
    """Multinomial logistic regression, full-batch L-BFGS (deterministic, no learning rate to tune)."""
    fc = nn.Linear(x.shape[1], classes).to(x.device)
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    opt = torch.optim.LBFGS(fc.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(fc(x), y) + 0.5 * l2 * fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return fc


def fast_probe(train_x, train_y, test_x, test_y, classes: int, seed: int = 0) -> dict:
    """Choose L2 on a held-out part of the training features only; refit; test once."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std  # statistics of train only
    n = train_x.shape[0]
    perm = torch.randperm(n, generator=seeded_generator("holdout", seed)).to(train_x.device)
    cut = int(0.8 * n)
    fit_idx, val_idx = perm[:cut], perm[cut:]
    scores = {}
    for l2 in FAST_L2_GRID:
        fc = fit_logistic(train_x[fit_idx], train_y[fit_idx], classes, l2)
        with torch.no_grad():
            scores[l2] = _topk(fc(train_x[val_idx]), train_y[val_idx], 1)
    best_l2 = max(FAST_L2_GRID, key=lambda v: (scores[v], v))  # ties: the stronger regulariser
    fc = fit_logistic(train_x, train_y, classes, best_l2)
    with torch.no_grad():
        logits = fc(test_x)
    return {"top1": _topk(logits, test_y, 1), "top5": _topk(logits, test_y, 5), "l2": best_l2,
            "holdout_top1": {str(k): v for k, v in scores.items()}}


# ---------------------------------------------------------------- standard protocol

def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def standard_probe(cfg: RunConfig, backbone: nn.Module, splits, device, classes: int,
                   resume: ProbeResume | None = None) -> dict:
    """The standard protocol; with `resume`, every epoch's state is kept so that a probe killed
    (preempted, out of time) goes on from its last epoch to the result an uninterrupted one gives."""
    before = _snapshot(backbone)
    backbone.eval()  # frozen, BN statistics included
    for p in backbone.parameters():
        p.requires_grad_(False)
    convs = [p for p in backbone.parameters() if p.dim() == 4]
    layout = (torch.channels_last if convs and convs[-1].is_contiguous(memory_format=torch.channels_last)
              else torch.contiguous_format)
    backbone.to(memory_format=torch.channels_last)  # faster inference convolutions; values unchanged
    try:
        return _train_classifier(cfg, backbone, before, splits, device, classes, resume)
    finally:
        backbone.to(memory_format=layout)


@dataclasses.dataclass(frozen=True)
class ProbeResume:
    """Where a standard probe keeps its per-epoch state, and what it must match to be resumed: the
    probe's settings and the checkpoint it probes (another of either starts afresh)."""
    directory: Path
    key: str

    @classmethod
    def of(cls, cfg: RunConfig, run_dir: Path, protocol: str, trained_epoch: int | None) -> ProbeResume:
        settings = {"probe": probe_settings(cfg, protocol), "test_subset": cfg.data.test_subset,
                    "seed": cfg.runtime.seed, "trained_epoch": trained_epoch}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cls(Path(run_dir) / f"probe-{protocol}-state", key)

    @property
    def path(self) -> Path:
        return self.directory / "state.pt"

    def load(self) -> dict | None:
        """The last epoch's state, if it is this probe's (a torn or foreign file: start afresh)."""
        try:
            state = ckpt.load_file(self.path) if self.path.exists() else None
        except ckpt.CheckpointError as exc:
            warnings.warn(f"{exc}; the probe starts from its first epoch", stacklevel=2)
            return None
        return state if state is not None and state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        ckpt.write(self.path, {**state, "key": self.key})  # atomically, as the run's checkpoints

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()


def _train_classifier(cfg: RunConfig, backbone: nn.Module, before: dict, splits, device, classes: int,
                      resume: ProbeResume | None = None) -> dict:
    e = cfg.eval
    fc = nn.Linear(backbone.out_dim, classes)
    with torch.no_grad():  # N(0, 0.01), zero bias; seeded so that a probe is reproducible
        g = seeded_generator("probe-fc", cfg.runtime.seed)
        fc.weight.copy_(0.01 * torch.randn(fc.weight.shape, generator=g))
        fc.bias.zero_()
    # The classifier is the only trained part; with probe_feature_bn it standardises its input first.
    classifier = (nn.Sequential(nn.BatchNorm1d(backbone.out_dim, affine=False), fc) if e.probe_feature_bn
                  else fc).to(device)
    # Weight decay on the fc weight only: the same penalty as the fast probe's L2 (bias unpenalised).
    opt = torch.optim.SGD([{"params": [fc.weight], "weight_decay": e.probe_weight_decay},
                           {"params": [fc.bias], "weight_decay": 0.0}], lr=e.probe_lr, momentum=0.9)
    milestones = [round(f * e.probe_epochs) for f in e.probe_milestones]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    spec = dataclasses.replace(RECIPES["probe"], crop_scale=tuple(e.probe_crop_scale))
    train_views, train_size = _train_views(cfg, spec, splits, device)
    # The backbone is frozen in eval mode, so main_lincls's per-epoch validation sees the same test
    # features every epoch: extract them once (identical numbers, one pass instead of `epochs`).
    test_feats, test_labels = extract(backbone, split_batches(cfg, "test", device, splits), device)
    best, history, start = {"top1": -1.0}, [], 0
    saved = resume.load() if resume is not None else None
    if saved is not None:  # every epoch's batches and augmentations come from seeds: this one goes on exactly
        classifier.load_state_dict(saved["classifier"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict({**saved["schedule"], "milestones": Counter(saved["schedule"]["milestones"])})
        best, history, start = saved["best"], saved["history"], saved["epoch"]
        print(f"[probe] resumed the standard probe after epoch {start} of {e.probe_epochs}", flush=True)
    for epoch in range(start, e.probe_epochs):
        for x, y in train_views(epoch):
            with torch.no_grad(), inference_autocast(device):
                feats = backbone(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(classifier(feats.float()), y)
            if not torch.isfinite(loss):
                raise ProbeError(f"standard probe diverged (loss {loss.item()}) at epoch {epoch}; "
                                 f"lower eval.probe_lr (now {e.probe_lr}).")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        classifier.eval()
        with torch.no_grad():
            logits = classifier(test_feats)
        classifier.train()
        current = {"epoch": epoch + 1, "top1": _topk(logits, test_labels, 1), "top5": _topk(logits, test_labels, 5)}
        history.append(current)
        if current["top1"] > best["top1"]:
            best = current
        if resume is not None:
            schedule = sched.state_dict()
            resume.save({"epoch": epoch + 1, "classifier": classifier.state_dict(), "optimizer": opt.state_dict(),
                         "schedule": {**schedule, "milestones": dict(schedule["milestones"])},
                         "best": best, "history": history})
            faults.kill_point("probe-epoch", resume.directory.parent, step=epoch + 1)
            faults.hold(epoch + 1, "probe-")
    # main_lincls's sanity check: the probe must not have touched the backbone.
    after = backbone.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    if changed:
        raise ProbeError(f"the backbone changed during the linear probe ({', '.join(changed[:3])}...)")
    last = history[-1]
    return {"top1": best["top1"], "top5": best["top5"], "best_epoch": best["epoch"],
            "last_top1": last["top1"], "last_top5": last["top5"], "top1_per_epoch": [h["top1"] for h in history],
            "fc_weight_norm": fc.weight.norm().item(),
            "train_size": train_size, "test_size": len(test_labels)}


def _train_views(cfg: RunConfig, spec, splits, device):
    """(epoch -> augmented (image, label) batches, training-set size): batched on the device for an
    in-memory dataset, a per-image DataLoader for an image folder."""
    bs, seed = cfg.eval.probe_batch_size, cfg.runtime.seed
    if splits is None:
        folder = folder_probe_set(cfg, spec)

        def folder_views(epoch):
            for x, y in folder_probe_loader(cfg, folder, device, epoch, bs):
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        return folder_views, len(folder)
    mean, std = NORMALIZATION[cfg.data.dataset]
    augment = BatchAugment(spec, cfg.data.image_size, mean, std)
    images, labels = splits.train_images.to(device), splits.train_labels.to(device)

    def tensor_views(epoch):
        order = torch.randperm(len(images), generator=seeded_generator("probe", seed, epoch))
        for step in range(len(images) // bs):
            idx = order[step * bs:(step + 1) * bs].to(device)
            yield augment(images[idx], seeded_generator("probe-aug", seed, epoch, step)), labels[idx]

    return tensor_views, len(images)


# ---------------------------------------------------------------- raw-pixel floor

def pixel_floor(cfg: RunConfig, splits, device, classes: int) -> float:
    """Fast probe on raw (normalised) pixels: what a representation must beat. Cached per dataset."""
    d = cfg.data
    key = hashlib.sha1(json.dumps([d.dataset, d.root, d.train_subset, d.test_subset, d.image_size]).encode())
    path = runio.cache_dir() / "pixel_floor" / f"{d.dataset}-{key.hexdigest()[:12]}.json"
    if path.exists():
        return json.loads(path.read_text())["top1"]
    flat = nn.Flatten()
    tr_x, tr_y = extract(flat, split_batches(cfg, "train", device, splits), device)
    te_x, te_y = extract(flat, split_batches(cfg, "test", device, splits), device)
    result = fast_probe(tr_x, tr_y, te_x, te_y, classes)
    runio.write_json(path, {"dataset": d.dataset, "top1": result["top1"], "l2": result["l2"]})
    return result["top1"]


# ---------------------------------------------------------------- entry points

def probe_backbone(cfg: RunConfig, backbone: nn.Module, splits, device, protocol: str,
                   resume: ProbeResume | None = None) -> dict:
    if splits is None and cfg.data.dataset != "imagefolder":
        splits = load_tensors(cfg)
    classes = NUM_CLASSES.get(cfg.data.dataset) or folder_classes(cfg)
    tic = time.perf_counter()
    if protocol == "fast":
        tr_x, tr_y = extract(backbone, split_batches(cfg, "train", device, splits), device)
        te_x, te_y = extract(backbone, split_batches(cfg, "test", device, splits), device)
        if tr_x.shape[1] != backbone.out_dim:
            raise ProbeError(f"feature dimension {tr_x.shape[1]} does not match the backbone's {backbone.out_dim}")
        result = {**fast_probe(tr_x, tr_y, te_x, te_y, classes, cfg.runtime.seed),
                  "train_size": len(tr_y), "test_size": len(te_y)}
    else:
        result = standard_probe(cfg, backbone, splits, device, classes, resume)
    out = {"protocol": protocol, **result, "seconds": time.perf_counter() - tic, "feature_dim": backbone.out_dim,
           "features_read_in": str(inference_dtype(device)).removeprefix("torch.")}
    if cfg.eval.pixel_floor and splits is not None:
        out["pixel_floor_top1"] = pixel_floor(cfg, splits, device, classes)
    return out


def probe_settings(cfg: RunConfig, protocol: str | None = None, epoch: int | None = None) -> dict:
    """What the probe of `protocol` (default: eval.probe) computes with (harness.run.evaluations), of the
    checkpoint at `epoch` (default: the last)."""
    found = evaluations.of(cfg, protocol, epoch)
    if found is None:
        raise ProbeError(f"no probe protocol to run (eval.probe={cfg.eval.probe}); choose one of {', '.join(evaluations.READS)}")
    return found


def probe_run(cfg: RunConfig, run_dir: Path, encoder: nn.Module, splits, device, protocol: str | None = None,
              epoch: int | None = None) -> dict:
    protocol = protocol or cfg.eval.probe
    faults.kill_point("probe", run_dir)
    resume = ProbeResume.of(cfg, run_dir, protocol, epoch)
    result = probe_backbone(cfg, encoder.backbone, splits, device, protocol, resume)
    result["epoch"] = epoch if epoch is not None else cfg.optim.epochs
    result["settings"] = probe_settings(cfg, protocol, result["epoch"])
    runio.write_json(evaluations.result_path(run_dir, result["settings"]), result)
    resume.clear()  # the result is written: its epochs' state is spent
    return result


def load_trained_moco(run_dir: Path, epoch: int | None = None) -> tuple[RunConfig, nn.Module, int]:
    """The whole MoCo model (both encoders, the dictionary) of a run's newest good checkpoint (or the
    one kept at `epoch`: runtime.keep_epochs), on the CPU, with its config and epoch. Never a fresh
    (random) one.

    Raises:
        ProbeError: no config.yaml, no usable checkpoint (of that epoch), or a checkpoint that does not fit the config.
    """
    from harness.model.moco import build_moco

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ProbeError(f"{run_dir}: no config.yaml; is this a run directory?")
    cfg = config_from_dict(runio.read_config(run_dir))
    state = ckpt.load_latest(run_dir / "checkpoints")
    if state is None:
        raise ProbeError(f"{run_dir}: no usable checkpoint in checkpoints/; there is no trained backbone to probe.")
    if epoch is not None and state["epoch"] != epoch:
        state = _kept(run_dir, epoch)
    bank = state["model"].get("bank")  # a memory-bank run: the bank's size is the training set's
    model = build_moco(cfg, bank_size=bank.shape[0] if bank is not None else None)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ProbeError(f"{state['path']}: does not fit the model of config.yaml "
                         f"(feature dimension or architecture differs): {str(exc).splitlines()[0]}") from None
    return cfg, model, state["epoch"]


def _kept(run_dir: Path, epoch: int) -> dict:
    path = runio.kept_checkpoint(run_dir / "checkpoints", epoch)
    if not path.exists():
        raise ProbeError(f"{run_dir}: no checkpoint of epoch {epoch} was kept; runtime.keep_epochs lists the epochs a "
                         f"run keeps for probes part-way (set it before training: it never changes what a run computes).")
    try:
        return {**ckpt.load_file(path), "path": str(path)}
    except ckpt.CheckpointError as exc:
        raise ProbeError(str(exc)) from None


def load_trained_encoder(run_dir: Path, device, epoch: int | None = None) -> tuple[RunConfig, nn.Module, int]:
    """The query encoder of a run's newest good checkpoint (or the one kept at `epoch`: load_trained_moco),
    on `device`."""
    cfg, model, epoch_loaded = load_trained_moco(run_dir, epoch)
    if epoch is None and epoch_loaded < cfg.optim.epochs:
        warnings.warn(f"{run_dir}: probing an unfinished run (epoch {epoch_loaded} of {cfg.optim.epochs})", stacklevel=2)
    return cfg, model.encoder_q.to(device), epoch_loaded
