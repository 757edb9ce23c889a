"""`python -m harness.bench walltime --run DIR[,DIR...]` (or a study's runs/ directory): where a trial's
wall time went, from its run directory's own files. Pretraining: from the attempt's start (attempts.jsonl,
after the interpreter and torch are loaded) to its last epoch's end (metrics.jsonl `time`), against the
sum of its epochs' training seconds (`epoch_seconds`): the rest is start-up, data loading, the kNN
monitor, the diagnostics and checkpoints. The probe's seconds are its result's own, apart.
Runs resumed, or made before epoch records carried `time`, are listed as not measured."""
from __future__ import annotations

from pathlib import Path

from harness.benchmarks.options import BenchOptions
from harness.run import evaluations, runio


def _runs(spec: str) -> list[Path]:
    out: list[Path] = []
    for part in spec.split(","):
        path = Path(part)
        out += sorted(p for p in path.iterdir() if p.is_dir()) if path.name == "runs" else [path]
    return out


def bench_walltime(args: BenchOptions) -> list[dict]:
    if not args.run:
        raise SystemExit("error: bench walltime needs --run DIR[,DIR...] or --run STUDY_DIR/runs")
    rows = []
    for run in _runs(args.run):
        attempts = runio.read_jsonl(run / "attempts.jsonl")
        epochs = [r for r in runio.read_jsonl(run / "metrics.jsonl") if r.get("kind") == "epoch"]
        row: dict = {"part": "walltime", "run": run.name, "attempts": len(attempts), "epochs": len(epochs)}
        if len(attempts) != 1 or not epochs or "time" not in epochs[-1]:
            rows.append({**row, "measured": "no (resumed, or epochs without a time)"})
            continue
        training = sum(r["epoch_seconds"] for r in epochs)
        wall = epochs[-1]["time"] - attempts[0]["start"]
        probes = evaluations.results(run)
        rows.append({**row, "training_s": training, "pretraining_wall_s": wall, "ratio": wall / training,
                     "monitor_epochs": sum("knn_top1" in r for r in epochs),
                     "probe_s": sum(p.get("seconds", 0.0) for p in probes) if probes else None})
    return rows
