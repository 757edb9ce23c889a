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

__version__ = "0.1.0"
