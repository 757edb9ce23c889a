"""A run's probe results, each kept under the settings that made it (its checkpoint's epoch included).

Evaluation is not part of a run's identity (harness.run.identity.EVALUATION): one pretraining may be
probed under several protocols and settings, by several studies. A result file says what it was made
with (`settings`: the protocol and the eval.* fields that protocol reads), and a trial's result is the one
whose settings are the trial's. So a study that asks for another probe shares the pretraining and adds a
file, and a probe already made is never made again or mistaken for another.

Files (result_path): probe.json, probe-<protocol>.json under the run's config.yaml settings, and
probe-<protocol>-<key>.json (key: a digest of the settings) under others. Files written before results
carried their settings (2026-12-03) were made with config.yaml's settings, and are read so.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from harness.run import runio
from harness.run.config import RunConfig, config_from_dict

# The eval.* fields each protocol reads (the fast probe: features without augmentation, its L2 chosen
# on held-out training images, nothing to set). Both read data.test_subset, which the probe face may
# change (`--set data.test_subset=...`); the training images, seed and trained weights are the run's own.
READS: dict[str, tuple[str, ...]] = {
    "fast": (),
    "standard": ("probe_epochs", "probe_lr", "probe_weight_decay", "probe_batch_size", "probe_milestones",
                 "probe_crop_scale", "probe_feature_bn"),
}


def settings(config: dict, protocol: str | None = None, epoch: int | None = None) -> dict[str, Any]:
    """What a probe computes with: the checkpoint's epoch (default: the last, optim.epochs), the protocol
    (default: eval.probe), the test images and the eval.* fields it reads. `config`: a whole config as a dict."""
    evaluation = config["eval"]
    protocol = protocol or evaluation["probe"]
    return {"protocol": protocol, "epoch": epoch or config["optim"]["epochs"], "test_subset": config["data"]["test_subset"],
            **{k: evaluation[k] for k in READS[protocol]}}


def of(cfg: RunConfig, protocol: str | None = None, epoch: int | None = None) -> dict | None:
    """The probe settings of a config (protocol default: its eval.probe; epoch: the last); None for eval.probe none."""
    protocol = protocol or cfg.eval.probe
    return settings(cfg.to_dict(), protocol, epoch) if protocol in READS else None


def key(probe_settings: dict) -> str:
    text = json.dumps(probe_settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def result_path(run_dir: Path, probe_settings: dict) -> Path:
    """probe.json for the probe the run's config.yaml names, probe-<protocol>.json for another protocol
    under config.yaml's settings for it (the names a reader of a run directory knows), and
    probe-<protocol>-<key>.json for any other settings (another study's probe of a shared run)."""
    run_dir, protocol = Path(run_dir), probe_settings["protocol"]
    made_with = _made_with(run_dir)
    if made_with and probe_settings == settings(made_with, protocol):
        return run_dir / ("probe.json" if protocol == made_with["eval"]["probe"] else f"probe-{protocol}.json")
    return run_dir / f"probe-{protocol}-{key(probe_settings)}.json"


def results(run_dir: Path) -> list[dict]:
    """Every probe result of a run, each with its `settings` (read from config.yaml for older files)."""
    found, made_with = [], None
    for path in sorted(Path(run_dir).glob("probe*.json")):
        result = runio.read_json(path)
        if not (result and "protocol" in result and "top1" in result):
            continue
        if "settings" not in result:  # older format: made with the run's own eval settings
            if made_with is None:
                made_with = _made_with(Path(run_dir))
            if result["protocol"] not in READS or not made_with:
                continue
            result = {**result, "settings": settings(made_with, result["protocol"], result.get("epoch"))}
        found.append(result)
    return found


def find(run_dir: Path, probe_settings: dict) -> dict | None:
    """The run's result made with these settings, or None."""
    return next((r for r in results(run_dir) if r["settings"] == probe_settings), None)


def configured(run_dir: Path) -> dict | None:
    """The probe settings the run's config.yaml names (None: no probe, or no readable config)."""
    made_with = _made_with(Path(run_dir))
    return settings(made_with) if made_with and made_with["eval"]["probe"] in READS else None


def configured_result(run_dir: Path) -> dict | None:
    """The result of the probe the run's config.yaml names; without a readable config.yaml, probe.json as it is."""
    probe = configured(run_dir)
    if probe is not None:
        return find(run_dir, probe)
    result = runio.read_json(Path(run_dir) / "probe.json")
    return result if "top1" in result else None


def _made_with(run_dir: Path) -> dict:
    """The config the run was first made with (its evaluation included), defaults filled in."""
    try:
        data = runio.read_config(run_dir)
        return json.loads(json.dumps(config_from_dict(data).to_dict()))
    except (OSError, yaml.YAMLError, ValueError):
        return {}
