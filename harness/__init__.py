"""MoCo ablation harness: pretraining runs, probes, studies and reports.

The package in layers (each imports only the layers below it; `lint-imports` checks it in CI):

    faces        study, train, probe, report, bench, decide: `python -m harness.<face>`; parse, call, print
    benchmarks   throughput and the device check                        (harness/benchmarks/)
    reporting    tables, verdicts, plots, the study and suite pages     (harness/reporting/)
    execution    the driver, suites, trial lifecycle, jobs, executors, storage   (harness/execution/)
    planning     study files, plans' decisions, estimates, shared runs  (harness/planning/)
    training     the pretraining loop, checkpoints, runtime, kNN, probes (harness/training/)
    model | data MoCo and its encoders | datasets and augmentation      (harness/model/, harness/data/)
    run          what a run is: config, identity, run-directory files, outcome (harness/run/)

planning, execution and reporting import no torch at module level: a driver's start stays light.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Where each module of the flat package (before the layers) lives now. Job files written by submitit
# before the move (`*_submitted.pkl`, read again by a restarted driver) name these old paths; the
# finder below serves them the module that holds the same classes now.
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


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import harness.launch` -> the module `harness.execution.jobs`, under both names."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module):  # already executed under its new name
        pass


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())  # first: an old name always means the moved module
