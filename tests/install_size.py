"""What an extra adds to an install: the distributions its requirements pull in beyond the project's
own, and their size on disk, read from the installed packages' metadata (run where the extra is
installed; nothing is downloaded).

    python tests/install_size.py track        # the extra's added distributions and MB
    python tests/install_size.py test track   # several
"""
from __future__ import annotations

import argparse
import re
from importlib import metadata

from packaging.requirements import Requirement


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _closure(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """Every installed distribution the requirements reach (markers evaluated here, extras of the
    named requirements followed)."""
    seen: set[str] = set()
    todo = [(Requirement(r), ()) for r in requirements]
    while todo:
        req, _ = todo.pop()
        env_extras = req.extras or {""}
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in env_extras):
            continue
        name = _name(req.name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for sub in dist.requires or []:
            r = Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append((r, ()))
    return seen


def _size_mb(name: str) -> float:
    dist = metadata.distribution(name)
    return sum((f.size or 0) for f in dist.files or []) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="+")
    args = parser.parse_args()
    project = metadata.distribution("moco-harness") if _installed("moco-harness") else None
    requires = [Requirement(r) for r in (project.requires or [])] if project else []
    base = _closure([str(r) for r in requires if r.marker is None])
    for extra in args.extras:
        wanted = [f"{r.name}{r.specifier}" for r in requires if r.marker and r.marker.evaluate({"extra": extra})]
        added = sorted(_closure(wanted) - base)
        total = sum(_size_mb(n) for n in added)
        print(f"[{extra}] adds {len(added)} distributions, {total:.0f} MB on disk "
              f"(beyond the project's own {len(base)}):")
        for n in sorted(added, key=_size_mb, reverse=True)[:12]:
            print(f"  {n:32s} {_size_mb(n):7.1f} MB")


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
