"""One MoCo pretraining run: `python -m harness.train --recipe R [--set k=v ...] [--out DIR] [--resume]`.

The face: it parses the command line, calls harness.training.pretrain.train, prints the result."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.run import process, runio
from harness.run.config import make_config
from harness.run.datafiles import check_dataset
from harness.run.errors import HarnessError
from harness.run.outcome import Outcome


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
    with process.start_up():  # torch, imported now, lives until the process exits (harness.run.process)
        import torch

        from harness.training.pretrain import train
    try:
        cfg = make_config(args.recipe, args.overrides, gpus=torch.cuda.device_count())  # auto: what this machine runs
        check_dataset(cfg)
        run_dir = args.out or runio.RESULTS / "runs" / args.recipe
        runio.check_writable(run_dir)
        result = train(cfg, run_dir, resume=args.resume, probe=not args.no_probe)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0 if result["status"] in (Outcome.COMPLETED, Outcome.PRUNED) else 3


if __name__ == "__main__":
    sys.exit(main())
