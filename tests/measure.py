"""Wall and CPU time of a command, as the suite's cost is stated in docs/testing.md.

    python tests/measure.py -- python -m pytest
    python tests/measure.py --hog 1 -- python -m pytest      # while a busy loop takes one core

CPU is the busy time of the whole machine (/proc/stat: user, nice, system, irq, softirq, steal),
so what runs outside the command's process tree (jobs under slurmd, PostgreSQL, MariaDB) counts;
run it on an otherwise idle machine. With --hog N, N busy processes of the same priority run for the
whole command and their own CPU is subtracted (each reads its own time when it ends)."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

BUSY = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest is already in user)


def machine_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[i] for i in BUSY) / os.sysconf("SC_CLK_TCK")


def _hog(stop, spent) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1
    spent.put(time.process_time())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hog", type=int, default=0, help="busy processes beside the command")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    stop, spent = mp.Event(), mp.Queue()
    hogs = [mp.Process(target=_hog, args=(stop, spent), daemon=True) for _ in range(args.hog)]
    for hog in hogs:
        hog.start()
    busy0, wall0 = machine_busy_s(), time.monotonic()
    rc = subprocess.call(command)
    wall, busy = time.monotonic() - wall0, machine_busy_s() - busy0
    stop.set()
    hog_s = sum(spent.get() for _ in hogs)
    for hog in hogs:
        hog.join()
    figures = {"command": " ".join(command), "rc": rc, "wall_s": round(wall, 1), "cpu_s": round(busy - hog_s, 1),
               "hogs": args.hog, "hog_cpu_s": round(hog_s, 1), "cores": os.cpu_count()}
    print(f"measure: {json.dumps(figures)}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
