"""Running a suite: a driver per member, all validated first, then the members in order (a later
member finds what an earlier one trained, harness.planning.shared). The suite file and its members'
study files: harness.planning.suitefile.
"""
from __future__ import annotations

from pathlib import Path

from harness.execution.driver import Driver
from harness.execution.status import dry_run
from harness.planning.suitefile import Suite, member_study


def member_drivers(suite: Suite, opts, folder: Path) -> list[Driver]:
    """A driver for every member, all validated before any runs (their study files in `folder`)."""
    return [Driver(member_study(suite, m, folder), opts) for m in suite.members]


def run_members(suite: Suite, drivers: list[Driver], opts) -> bool:
    """The members in order. False: --no-wait stopped after submitting one (rerun to go on)."""
    for driver in drivers:
        print(f"[suite {suite.name}] study {driver.name}", flush=True)
        driver.open_and_run()
        if not opts.wait:
            print(f"[suite {suite.name}] --no-wait: members run one after another, so the suite goes on "
                  f"from here when this command is run again.")
            return False
    return True


def suite_plan(suite: Suite, drivers) -> str:
    """Each member's dry run, then what the suite trains: runs already finished elsewhere and runs an
    earlier member trains are shared, counted once."""
    lines, seen, total, finished = [f"suite {suite.name}: {suite.description.strip()}"], set(), 0, 0
    runs = drivers[0].runs.by_digest()  # one results root for every member
    for driver in drivers:
        lines += ["", dry_run(driver)]
        for _params, cfg in driver.points:
            digest = cfg.digest()
            total += 1
            if digest in seen:
                continue
            seen.add(digest)
            finished += digest in runs
    if not drivers[0].opts.share:
        return "\n".join([*lines, "", f"suite {suite.name}: {total} trials in {len(drivers)} studies, all trained "
                                       f"(--no-share)."])
    lines += ["", f"suite {suite.name}: {total} trials in {len(drivers)} studies; {len(seen)} distinct runs, "
              f"{finished} of them already finished: {len(seen) - finished} to train, "
              f"{total - len(seen) + finished} trials shared."]
    return "\n".join(lines)
