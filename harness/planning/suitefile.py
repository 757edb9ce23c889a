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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.planning.studyfile import STUDY_DIR, Study, load_study, load_study_file
from harness.run import runio
from harness.run.config import build_typed
from harness.run.errors import ConfigError, StudyError


@dataclass
class SuiteFile:
    """A suite file as written, typed (read by the run config's coercion, as study files are)."""
    suite: list[Any] = field(metadata={"expects": "a non-empty list of study names (or {study: NAME, factors: ...})"})
    description: str = ""


@dataclass
class MemberEntry:
    """One entry of `suite:` written as a mapping."""
    study: str
    factors: dict[str, Any] | None = None  # a subset of the study's levels


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
    """A suite file: its members, each a study that loads, with an optional subset of its levels.

    Raises:
        StudyError: an unknown or missing key, an empty list, a member that is not a study (or is a
            suite), levels that are not the study's, a study listed twice.
    """
    try:
        raw: SuiteFile = build_typed(SuiteFile, yaml.safe_load(path.read_text()), what="suite key")
    except ConfigError as exc:
        raise StudyError(f"{path}: {exc}") from None
    if not raw.suite:
        raise StudyError(f"{path}: suite: a non-empty list of study names (or {{study: NAME, factors: ...}}) "
                         f"is required.")
    members = []
    for i, item in enumerate(raw.suite):
        where = f"{path}: suite[{i}]"
        try:
            entry: MemberEntry = build_typed(MemberEntry, {"study": item} if isinstance(item, str) else item,
                                             what="member key")
        except ConfigError as exc:
            raise StudyError(f"{where}: {exc} A member is a study name, or a mapping "
                             f"{{study: NAME, factors: {{KEY: [levels]}}}}.") from None
        if suite_path(entry.study) is not None:
            raise StudyError(f"{where}: {entry.study} is a suite; a suite lists studies.")
        study = load_study(entry.study)  # an unknown name fails here, with the close matches
        if entry.factors is not None:
            _check_subset(where, study, entry.factors)
        members.append(Member(study.name, entry.study, entry.factors))
    names = [m.study for m in members]
    if len(set(names)) != len(names):
        raise StudyError(f"{path}: suite: {sorted({n for n in names if names.count(n) > 1})[0]} is listed twice.")
    return Suite(path.stem, path, raw.description, members)


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


