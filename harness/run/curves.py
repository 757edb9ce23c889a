"""A run's curves as trackers show them, read from its metrics.jsonl: the one list of what is
plotted, shared by the TensorBoard logs (harness.reporting.tensorboard) and the MLflow relay
(harness.execution.tracking).

Series are named `step/<metric>` (x: the global step), `epoch/<metric>` (x: the epoch) and
`final/<metric>` (the trial's result, at the last epoch). metrics.jsonl is truncated to the
checkpoint when a run resumes, so reading it gives each point once.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from harness.run import runio

STEP_SCALARS = ("loss", "lr")
EPOCH_SCALARS = ("loss", "pretext_acc", "knn_top1", "lr", "key_consistency", "alignment", "uniformity",
                 "effective_rank", "epoch_seconds")
FINAL_METRICS = ("probe_top1", "probe_top5", "knn_top1", "final_loss")


class Point(NamedTuple):
    series: str  # e.g. "epoch/knn_top1"
    x: int  # the global step, or the epoch
    value: float


def points(records: list[dict]) -> Iterator[Point]:
    """Every plotted point of a run's records, in the order logged."""
    names: tuple[str, ...]
    for r in records:
        if r.get("kind") == "step":
            names, prefix, x = STEP_SCALARS, "step", r.get("step", 0)
        elif r.get("kind") == "epoch":
            names, prefix, x = EPOCH_SCALARS, "epoch", r.get("epoch", 0)
        else:
            continue
        for name in names:
            value = r.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield Point(f"{prefix}/{name}", int(x), float(value))


def read(run_dir: Path) -> list[Point]:
    return list(points(runio.read_jsonl(Path(run_dir) / "metrics.jsonl")))


def last_epoch(records: list[dict]) -> int:
    return max((int(r["epoch"]) for r in records if r.get("kind") == "epoch"), default=0)


def final(values: dict) -> dict[str, float]:
    """The final metrics among a trial's results (e.g. its Optuna user attributes)."""
    return {m: float(values[m]) for m in FINAL_METRICS
            if isinstance(values.get(m), (int, float)) and not isinstance(values.get(m), bool) and values[m] == values[m]}
