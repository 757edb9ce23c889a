"""Suites: several studies run as one ablation (`python -m harness.study moco_ablation`): their files.

    description: the whole MoCo ablation
    suite:
      - momentum_sweep                          # a study as its file says
      - study: temperature_sweep                # or with fewer levels (a subset of the file's)
        factors: {moco.temperature: [0.07, 0.1, 0.2], moco.mlp: [false]}

Each member is an ordinary study named <suite>/<member>, with its own storage and directory under
results/<suite>/; runs the members share (same identity, same seed) are trained once and reused by
the others (harness.planning.shared). Members run one after another, so a later member finds what an earlier
one trained. Every member is validated before the first job is submitted. The suite report
(harness.reporting.suite_report) puts every member's panel, its paper values and the suite's cost on one page.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.planning.studyfile import STUDY_DIR, Study, load_study, load_study_file
from harness.run import runio
from harness.run.errors import StudyError

SUITE_KEYS = {"description", "suite"}


@dataclass
class Member:
    study: str  # the study's name (its file's stem)
    source: str  # as the suite names it: a name in studies/ or a study file's path
    factors: dict[str, list] | None  # a subset of its levels; None: all


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    members: list[Member]


def suite_path(name: str) -> Path | None:
    """The file of suite `name` (a name in studies/ or a path), or None when it is not a suite."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STUDY_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None  # load_study reports it
    return path.resolve() if isinstance(data, dict) and "suite" in data else None


def load_suite(path: Path) -> Suite:
    data = yaml.safe_load(path.read_text())
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise StudyError(f"{path}: {sorted(unknown)[0]}: unknown key in a suite; allowed: description, suite.")
    entries = data.get("suite")
    if not isinstance(entries, list) or not entries:
        raise StudyError(f"{path}: suite: a non-empty list of study names (or {{study: NAME, factors: ...}}) "
                         f"is required.")
    members = []
    for i, entry in enumerate(entries):
        where = f"{path}: suite[{i}]"
        if isinstance(entry, str):
            entry = {"study": entry}
        if not isinstance(entry, dict) or set(entry) - {"study", "factors"} or "study" not in entry:
            raise StudyError(f"{where}: a study name, or a mapping {{study: NAME, factors: {{KEY: [levels]}}}}.")
        if suite_path(str(entry["study"])) is not None:
            raise StudyError(f"{where}: {entry['study']} is a suite; a suite lists studies.")
        study = load_study(str(entry["study"]))  # an unknown name fails here, with the close matches
        factors = entry.get("factors")
        if factors is not None:
            _check_subset(where, study, factors)
        members.append(Member(study.name, str(entry["study"]), factors))
    names = [m.study for m in members]
    if len(set(names)) != len(names):
        raise StudyError(f"{path}: suite: {sorted({n for n in names if names.count(n) > 1})[0]} is listed twice.")
    return Suite(path.stem, path, str(data.get("description", "")), members)


def _check_subset(where: str, study: Study, factors: Any) -> None:
    if study.sampler != "grid":
        raise StudyError(f"{where}: factors: {study.name} is a search; only a grid's levels can be narrowed.")
    if not isinstance(factors, dict):
        raise StudyError(f"{where}: factors: a mapping of factor keys to lists of levels is required.")
    for key, levels in factors.items():
        if key not in study.factors:
            raise StudyError(f"{where}: factors.{key}: not a factor of {study.name} "
                             f"(its factors: {', '.join(study.factors)}).")
        extra = [v for v in (levels if isinstance(levels, list) else [levels]) if v not in study.factors[key]]
        if not isinstance(levels, list) or not levels or extra:
            raise StudyError(f"{where}: factors.{key}: a non-empty subset of {study.name}'s levels "
                             f"{study.factors[key]} is required{f'; not among them: {extra}' if extra else ''}.")


def member_study(suite: Suite, member: Member, folder: Path) -> Study:
    """The member as a study named <suite>/<member>: its file with the suite's levels, written to
    `folder` (the driver stores the copy it starts from, as for any study)."""
    source = load_study(member.source)
    data = yaml.safe_load(source.path.read_text())
    if member.factors is not None:
        data["factors"] = {key: member.factors.get(key, levels) for key, levels in source.factors.items()}
        data["description"] = f"{source.description.strip()} (levels narrowed by suite {suite.name})"
    path = folder / f"{member.study}.yaml"
    runio.write_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return load_study_file(path, f"{suite.name}/{member.study}")


