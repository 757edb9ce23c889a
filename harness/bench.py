"""`python -m harness.bench [train] [data] [probe] [overhead] [diagnostics] [device]`: throughput, measured, not guessed.

The parts are harness.benchmarks.parts (and the device check, harness.benchmarks.devicecheck); this
face parses, runs the parts asked for, prints a table and writes JSON to results/bench/."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

from harness.benchmarks.options import BenchOptions
from harness.run import process, runio
from harness.run.errors import HarnessError, require_at_least


def main(argv=None) -> int:
    with process.start_up():  # torch, imported now, lives until the process exits (harness.run.process)
        from harness.benchmarks import devicecheck
        from harness.benchmarks.parts import PARTS as MEASUREMENTS
        from harness.benchmarks.parts import format_rows
        from harness.training.runtime import machine_description
    parts = {**MEASUREMENTS, "device": devicecheck.run}
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["train", "data"], help=f"any of {', '.join(parts)}")
    parser.add_argument("--recipe", default="fmnist-tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override (train, data); eval.* or data.test_subset of the run's config (probe)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="use N random images of the dataset's shape instead of its files")
    parser.add_argument("--synthetic-jpeg", type=int, default=0, metavar="N",
                        help="data part, image-folder recipes: write N photo-like 500x375 JPEGs to a temporary "
                             "folder and time the input pipelines on them (else data.root is read)")
    parser.add_argument("--run", help="a finished run directory (probe part); DIR,DIR,... (monitor part)")
    parser.add_argument("--probe-epochs", type=int, help="standard probe epochs (default: the run's config)")
    parser.add_argument("--out", type=Path, default=runio.RESULTS / "bench", help="where the JSON goes (default: $HARNESS_RESULTS/bench)")
    parser.add_argument("--size", choices=["auto", "full", "small"], default="auto",
                        help="device part: full on a GPU, small (seconds, the same code) on a CPU; auto picks")
    args = parser.parse_args(argv)
    # packing's own options (batched_only, barrier) are set by the device check, not on the command line
    options = BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions) if hasattr(args, f.name)})
    try:
        for flag, low, meaning in (("--steps", 1, "timed steps per repeat"), ("--warmup", 0, "untimed steps first"),
                                   ("--repeats", 1, "repeats, their median reported"),
                                   ("--synthetic", 0, "0: the dataset's files"), ("--synthetic-jpeg", 0, "0: data.root")):
            require_at_least(flag, getattr(args, flag[2:].replace("-", "_")), low, meaning)
        if args.probe_epochs is not None:
            require_at_least("--probe-epochs", args.probe_epochs, 1, "epochs of the standard probe")
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = [p for p in args.parts if p not in parts]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(parts)}")
    results = {"machine": machine_description(), "python": platform.python_version(), "argv": sys.argv[1:],
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": []}
    print(f"machine: {results['machine']}")
    for part in args.parts:
        try:
            rows = parts[part](options)
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        results["rows"] += rows
        print(devicecheck.table(rows) if part == "device" else format_rows(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{'-'.join(args.parts)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
