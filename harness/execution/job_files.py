"""The driver's reader of submitit's job files (`<job>_submitted.pkl`, `<job>_result.pkl`).

Older format: job files written before the package was laid out in layers (commit 30f5ba9, 2026-12-02)
name the flat package's module paths (`harness.launch.TrialJob`, `harness.trial.TrialSpec`,
`harness.config.RunConfig`). This unpickler maps them to the modules that hold the same classes now;
nothing else serves the old names (`import harness.config` fails). It can go once no study started
before 2026-12-02 is still running: a finished study never reads its job files again.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

# Where each module of the flat package lives now (old name -> new path under harness).
MOVED = {
    "config": "run.config", "runio": "run.runio", "outcome": "run.outcome", "snapshot": "run.snapshot",
    "datafiles": "run.datafiles", "faults": "run.faults", "trial_result": "run.trial_result",
    "moco": "model.moco", "backbones": "model.backbones", "batchnorm": "model.batchnorm",
    "shuffle_bn": "model.shuffle_bn", "distributed": "model.distributed",
    "augment": "data.augment", "folder_views": "data.folder_views",
    "checkpoint": "training.checkpoint", "runtime": "training.runtime", "knn": "training.knn",
    "features": "training.features", "diagnostics": "training.diagnostics",
    "studyfile": "planning.studyfile", "spending": "planning.spending", "estimate": "planning.estimate",
    "shared": "planning.shared", "resources": "planning.resources", "input_budget": "planning.input_budget",
    "suite": "execution.suite", "trial": "execution.trial", "launch": "execution.jobs",
    "worker": "execution.worker", "storage": "execution.storage", "optuna_adapter": "execution.optuna_adapter",
    "pruning_relay": "execution.pruning_relay",
    "suite_report": "reporting.suite_report", "consistency_report": "reporting.consistency_report",
    "bench_folders": "benchmarks.folders", "devicecheck": "benchmarks.devicecheck",
    "gpu_checks": "benchmarks.gpu_checks",
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        package, _, old = module.partition(".")
        if package == "harness" and old in MOVED:
            module = f"harness.{MOVED[old]}"
        return super().find_class(module, name)


def load(path: Path) -> Any:
    """A job file's object (submitit writes them with cloudpickle; plain pickle reads them)."""
    with open(path, "rb") as f:
        return _Unpickler(f).load()
