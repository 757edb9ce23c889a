"""`python -m harness.decide`: simulate adaptive replication (harness.planning.decide): error rates
and trials spent, for each spending rule on the same simulated races."""
from __future__ import annotations

import argparse
import json
import sys

from harness.planning.decide import SCENARIOS, RaceSpec, error_rates
from harness.planning.spending import SPENDING
from harness.run import process
from harness.run.errors import HarnessError, require_at_least


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.decide",
                                     description="Simulate adaptive replication: error rates and trials spent.")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--initial", type=int, default=2)
    parser.add_argument("--max", type=int, default=8)
    parser.add_argument("--margin", type=float, default=0.005)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--spending", nargs="+", choices=SPENDING, default=list(SPENDING),
                        help="the rules to compare, each on the same simulated races (default: all)")
    args = parser.parse_args(argv)
    try:
        require_at_least("--runs", args.runs, 1, "simulated races per scenario")
        require_at_least("--initial", args.initial, 2, "the fewest seeds a paired interval can use")
        require_at_least("--max", args.max, args.initial, "seeds per level at most, from --initial")
        require_at_least("--margin", args.margin, 0, "a difference in the objective's units")
        require_at_least("--confidence", args.confidence, 0.5, "below 1")
        if not args.confidence < 1:
            raise HarnessError(f"--confidence: must be below 1, got {args.confidence:g}.")
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for spending in args.spending:
        spec = RaceSpec(args.initial, args.max, args.margin, args.confidence, spending)
        for name, scenario in SCENARIOS.items():
            print(json.dumps({"spending": spending, "scenario": name,
                              **error_rates(spec=spec, runs=args.runs, **scenario)}))
    return 0


if __name__ == "__main__":
    process.freeze_imports()
    sys.exit(main())
