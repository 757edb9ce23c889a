"""Linear probes on a frozen backbone: `python -m harness.probe RUN_DIR --protocol fast|standard`.

The face: it parses the command line, calls harness.training.probe, prints the result."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.run import process
from harness.run.config import EVAL_ONLY, PROBE_PROTOCOLS, RunConfig, with_overrides
from harness.run.errors import HarnessError, require_at_least

PROBE_RUNTIME = ("runtime.device", "runtime.threads", "runtime.precision")  # what --set may say of this machine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.probe", description="Linear probe of a finished run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--protocol", choices=PROBE_PROTOCOLS, help="default: the run config's eval.probe")
    parser.add_argument("--epochs", type=int, help="standard protocol epochs (default: eval.probe_epochs)")
    parser.add_argument("--epoch", type=int, help="probe the checkpoint kept at this training epoch (runtime.keep_epochs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change how the run is evaluated (eval.*, data.test_subset; runtime.device, "
                             "runtime.threads, and runtime.precision: how features are read), e.g. --set eval.probe_lr=1")
    args = parser.parse_args(argv)
    with process.start_up():  # torch, imported now, lives until the process exits (harness.run.process)
        from harness.training.probe import load_trained_encoder, probe_run
        from harness.training.runtime import Runtime, inference_precision
    try:
        if args.epochs is not None:
            require_at_least("--epochs", args.epochs, 1, "epochs of the standard probe")
        # This machine's runtime, not the run's (it may have trained on another): device and threads as
        # given here; precision says how features are read (inference_precision), never how the
        # checkpoint trained, so an older GPU is not refused the bf16 a run trained in.
        machine = with_overrides(RunConfig(), [o for o in args.overrides if o.startswith("runtime.")],
                                 only=PROBE_RUNTIME)
        precision = machine.runtime.precision
        device = Runtime.for_config(with_overrides(machine, ["runtime.precision=fp32"])).apply().device
        cfg, encoder, epoch = load_trained_encoder(args.run_dir, device, args.epoch)
        evaluation = [o for o in args.overrides if not o.startswith("runtime.")]
        cfg = with_overrides(cfg, evaluation + ([f"eval.probe_epochs={args.epochs}"] if args.epochs else []),
                             only=EVAL_ONLY)
        protocol = args.protocol or (cfg.eval.probe if cfg.eval.probe != "none" else "fast")
        with inference_precision(precision):
            result = probe_run(cfg, args.run_dir, encoder, None, device, protocol, epoch)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
