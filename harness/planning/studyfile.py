"""Study files (`studies/<name>.yaml`): declarative data, validated on load.

    description: what the study asks
    recipe: fmnist-tiny              # base run recipe; --recipe swaps it
    overrides: [optim.epochs=8]      # --set style, applied before the factors
    sampler: grid                    # grid: every level x seed; tpe: a search
    factors:                         # dotted config keys
      moco.momentum: [0.0, 0.9, 0.99]                       # grid levels
      moco.temperature: {type: float, low: 0.05, high: 0.5, log: true}   # search distribution
    seeds: [0, 1]                    # a fixed design; or adaptive: {initial: 2, max: 8} (seeds 0..max-1)
    decide: {margin: 0.005, confidence: 0.95}   # adaptive seeds: when a difference is settled
    n_trials: 20                     # tpe only (per seed list: each trial uses seeds[0])
    objective: probe_top1            # probe_top1 | knn_top1
    direction: maximize
    pruner: none                     # none | median | hyperband | successive_halving | threshold,
                                     # or {type: median, n_startup_trials: 5} (arguments of Optuna's pruner)
    resources: {time_min: 600}      # per trial; overrides the recipe's own `resources` (its scale)
    retries: 2
    reference: {source: ..., metric: ..., values: {0.9: 55.2, 0.0: fail}}
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.planning.decide import RaceSpec
from harness.planning.resources import Resources, check_resources
from harness.planning.resources import merge as merge_resources
from harness.planning.spending import SPENDING
from harness.run.config import RunConfig, build_typed, load_recipe_data, make_config, nest
from harness.run.errors import ConfigError, StudyError
from harness.run.mechanisms import mechanism

STUDY_DIR = Path(__file__).resolve().parents[2] / "studies"
STUDY_COPY = "study.yaml"  # results/<study>/study.yaml: the file a study was started from
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
PRUNER_ARGS = {  # the Optuna pruner arguments a study file may set
    "none": set(), "median": {"n_startup_trials", "n_warmup_steps"},
    "hyperband": {"min_resource", "reduction_factor"}, "successive_halving": {"min_resource", "reduction_factor"},
    "threshold": {"lower", "upper", "n_warmup_steps"},
}
PRUNERS = tuple(PRUNER_ARGS)


@dataclass
class Study:
    name: str
    path: Path
    description: str
    recipe: str
    factors: dict[str, Any]
    seeds: list[int]
    sampler: str = "grid"
    overrides: list[str] = field(default_factory=list)
    n_trials: int = 0
    objective: str = "probe_top1"
    direction: Literal["maximize", "minimize"] = "maximize"
    pruner: str = "none"
    pruner_args: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)  # overrides of the recipe's resources
    retries: int = 2
    reference: dict = field(default_factory=dict)
    race: RaceSpec | None = None  # adaptive seeds (harness.planning.decide); None: every level gets every seed
    tracking: dict = field(default_factory=dict)  # {mlflow: URI}: the driver relays the runs (harness.execution.tracking)

    def resources_for(self, recipe: str | None = None) -> Resources:
        """The recipe's resources (its scale: CPU minutes or GPU days), the user's cluster file (site
        defaults), then the study's own (harness.planning.resources)."""
        return self.resources_with_sources(recipe)[0]

    def resources_with_sources(self, recipe: str | None = None) -> tuple[Resources, dict[str, str]]:
        """resources_for, and where each value set anywhere came from (what --dry-run shows)."""
        recipe = recipe or self.recipe
        base = load_recipe_data(recipe).get("resources", {}) or {}
        return merge_resources(recipe, base, self.path, self.resources)

    # -- trials ------------------------------------------------------------------------------
    def grid(self) -> list[dict[str, Any]]:
        """Every combination of levels, times every seed, in file order."""
        names = list(self.factors)
        points = []
        for levels in itertools.product(*(self.factors[n] for n in names)):
            for seed in self.seeds:
                points.append({**dict(zip(names, levels)), "seed": seed})
        return points

    def run_config(self, params: dict[str, Any], recipe: str | None = None, extra: Sequence[str] = (),
                   run_name: str | None = None) -> RunConfig:
        """The point's config: recipe, the study's overrides, --set, then the factor levels and seed."""
        levels = [nest(key, value) for key, value in params.items() if key != "seed"]
        seed = nest("runtime.seed", params.get("seed", self.seeds[0]))
        gpus = self.resources_for(recipe).gpus  # `auto` device and precision become what the trial's job runs
        return make_config(recipe or self.recipe, [*self.overrides, *extra, *levels, seed], name=run_name, gpus=gpus)

    def check_overrides(self, overrides: list[str], source: str) -> None:
        """An override of a factor's key (or of the seed) would be silently replaced by each level."""
        owned = {**{k: self.factors[k] for k in self.factors}, "runtime.seed": self.seeds}
        for text in overrides:
            key = text.split("=", 1)[0].strip()
            for factor, levels in owned.items():
                if key == factor or factor.startswith(key + "."):
                    what = "the seeds" if factor == "runtime.seed" else "a factor"
                    raise StudyError(f"{source} {text}: {factor} is {what} of study '{self.name}' "
                                     f"(levels {levels}); each trial sets it, so this value would be ignored. "
                                     f"Drop it, or change the levels in the study file.")


def trial_key(params: dict[str, Any]) -> str:
    """A readable, filesystem-safe identity of a trial's parameters (its run directory name)."""
    parts = []
    for key in sorted(params):
        value = params[key]
        text = repr(value) if isinstance(value, float) else str(value)
        parts.append(f"{key.split('.')[-1]}={text}")
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def _fail(path: Path, key: str, message: str) -> StudyError:
    return StudyError(f"{path}: {key}: {message}")


def _check_distribution(path: Path, key: str, spec: dict) -> None:
    kind = spec.get("type")
    if kind in ("float", "int"):
        for bound in ("low", "high"):
            if not isinstance(spec.get(bound), (int, float)) or isinstance(spec.get(bound), bool):
                raise _fail(path, f"factors.{key}.{bound}", "a number is required for a float/int distribution.")
        if spec["low"] >= spec["high"]:
            raise _fail(path, f"factors.{key}", f"low ({spec['low']}) must be below high ({spec['high']}).")
        unknown = set(spec) - {"type", "low", "high", "log", "step"}
        if unknown:
            raise _fail(path, f"factors.{key}", f"unknown keys {sorted(unknown)}; allowed: type, low, high, log, step.")
    elif kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise _fail(path, f"factors.{key}.choices", "a non-empty list is required.")
    else:
        raise _fail(path, f"factors.{key}.type", f"{kind!r} is not a distribution; use float, int or categorical.")


def load_study(name: str) -> Study:
    """A study by name (studies/<name>.yaml) or by the path of a study file.

    Returns:
        The Study: factors, seeds (or a race), sampler, objective, pruner, resources and reference,
        each checked; the levels themselves are checked against the recipe by validate_levels.

    Raises:
        StudyError: no such study (the nearest name proposed), a file that is not YAML, an unknown
            or missing key, a value of the wrong kind, or an override of a factor's own key.
    """
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        path = Path(name).resolve()
        if not NAME.match(path.stem):
            raise StudyError(f"{path}: the file name must be letters, digits, '-', '_' and '.' only.")
        return load_study_file(path, path.stem)
    if not NAME.match(name) or ".." in name:
        raise StudyError(f"study name {name!r}: use letters, digits, '-', '_' and '.' only (no paths).")
    path = STUDY_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, study_names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise StudyError(f"unknown study '{name}'.{hint} Available: {', '.join(study_names())}.")
    return load_study_file(path, name)


def load_study_file(path: Path, name: str) -> Study:
    """The study in `path` under `name` (a copy stored with results keeps its study's name)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML: {exc}") from None
    return parse_study(name, path, data)


@dataclass
class StudyFile:
    """A study file as written, each top-level key typed: read by the run config's coercion
    (harness.run.config.build_typed), so a wrong key or type is said as a config's is. What spans
    several keys (levels by sampler, seeds with `decide`, a pruner's arguments) is checked in
    parse_study."""
    description: str
    recipe: str
    factors: dict[str, Any] = field(metadata={"expects": "a mapping of dotted config keys to levels, e.g. "
                                                         "{moco.momentum: [0.9, 0.99]}"})
    seeds: Any  # a list of seeds (fixed design) or {initial, max} (a race with `decide`)
    sampler: Literal["grid", "tpe"] = "grid"  # grid: ablations; tpe: searches
    overrides: list[str] = field(default_factory=list,
                                 metadata={"expects": "a list of 'section.key=value' strings"})
    n_trials: int = 0
    objective: Literal["probe_top1", "knn_top1"] = "probe_top1"
    direction: Literal["maximize", "minimize"] = "maximize"
    pruner: Any = "none"  # a name, or {type: name, ...its arguments}
    resources: dict[str, Any] = field(default_factory=dict)
    retries: int = 2
    reference: dict[str, Any] = field(default_factory=dict,
                                      metadata={"expects": "a mapping {source, metric, values}"})
    decide: dict[str, Any] | None = None
    tracking: dict[str, str] = field(default_factory=dict,
                                     metadata={"expects": "a mapping {mlflow: URI}, e.g. {mlflow: http://mlflow.lab:5000}"})



TRACKERS = ("mlflow",)  # the trackers a driver relays to (harness.execution.tracking)
_REQUIRED = {f.name for f in dataclasses.fields(StudyFile)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def parse_study(name: str, path: Path, data: Any) -> Study:
    """A study file's contents as a Study.

    Raises:
        StudyError: the file's path and the key, with what to write instead.
    """
    if isinstance(data, dict):  # an empty optional key (`overrides:`) means its default; a required one stays
        data = {k: v for k, v in data.items() if v is not None or k in _REQUIRED}
    try:
        raw: StudyFile = build_typed(StudyFile, data, what="study key")
    except ConfigError as exc:
        raise StudyError(f"{path}: {exc}") from None
    if not raw.factors:
        raise _fail(path, "factors", "a mapping of dotted config keys to levels is required.")
    for key, levels in raw.factors.items():
        _check_levels(path, key, levels, raw.sampler)
    seeds, race = _parse_seeds(path, raw.seeds, raw.decide, raw.sampler)
    pruner, pruner_args = _parse_pruner(path, raw.pruner)
    if raw.sampler == "tpe" and raw.n_trials < 1:
        raise _fail(path, "n_trials", "a search (sampler: tpe) needs n_trials >= 1.")
    if not 0 <= raw.retries <= 20:
        raise _fail(path, "retries", "an integer from 0 to 20 is required.")
    check_resources(path, raw.resources, whole=False)
    for tracker in raw.tracking:
        if tracker not in TRACKERS:
            raise _fail(path, f"tracking.{tracker}", f"unknown tracker; one of {', '.join(TRACKERS)} (TensorBoard "
                        "logs are written by every report, with no setting).")
    study = Study(name=name, path=path, description=raw.description, recipe=raw.recipe, factors=raw.factors,
                  seeds=seeds, sampler=raw.sampler, overrides=raw.overrides, n_trials=raw.n_trials,
                  objective=raw.objective, direction=raw.direction, pruner=pruner, pruner_args=pruner_args,
                  resources=raw.resources, retries=raw.retries, reference=raw.reference, race=race,
                  tracking=raw.tracking)
    study.check_overrides(raw.overrides, f"{path}: overrides:")
    return study


def _check_levels(path: Path, key: str, levels: Any, sampler: str) -> None:
    """A grid's levels: a non-empty list, each once; a search's: a distribution or a list of choices."""
    if sampler == "grid":
        if not isinstance(levels, list) or not levels:
            raise _fail(path, f"factors.{key}", "a grid study needs a non-empty list of levels.")
        if len({json.dumps(v) for v in levels}) != len(levels):
            raise _fail(path, f"factors.{key}", "levels repeat; list each level once.")
    elif isinstance(levels, dict):
        _check_distribution(path, key, levels)
    elif not (isinstance(levels, list) and levels):
        raise _fail(path, f"factors.{key}", "a distribution {type, low, high} or a list of choices is required.")


def _parse_pruner(path: Path, spec: Any) -> tuple[str, dict]:
    """`pruner: median` or `pruner: {type: median, n_startup_trials: 5}`: the name and its arguments."""
    pruner, args = spec, {}
    if isinstance(spec, dict):
        args = {k: v for k, v in spec.items() if k != "type"}
        pruner = spec.get("type")
    if pruner not in PRUNERS:
        raise _fail(path, "pruner", f"{pruner!r}: use one of {', '.join(PRUNERS)} (or a mapping with 'type').")
    for key, value in args.items():
        if key not in PRUNER_ARGS[pruner]:
            raise _fail(path, f"pruner.{key}", f"not an argument of the {pruner} pruner; allowed: "
                        f"{', '.join(sorted(PRUNER_ARGS[pruner])) or 'none'}.")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(path, f"pruner.{key}", f"a number is required, got {value!r}.")
    return pruner, args


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_seeds(path: Path, seeds: Any, decide: Any, sampler: str) -> tuple[list[int], RaceSpec | None]:
    """A list of seeds (fixed design), or {initial, max} with `decide` (adaptive replication)."""
    if isinstance(seeds, dict):
        if sampler != "grid":
            raise _fail(path, "seeds", "adaptive seeds {initial, max} race the levels of a grid; use a list here.")
        unknown = set(seeds) - {"initial", "max"}
        if unknown or not all(_is_int(seeds.get(k)) for k in ("initial", "max")):
            raise _fail(path, "seeds", "adaptive seeds are {initial: N, max: M} with whole numbers, e.g. "
                        "{initial: 2, max: 8}.")
        if not 2 <= seeds["initial"] <= seeds["max"] <= 100:
            raise _fail(path, "seeds", f"need 2 <= initial <= max <= 100 (two seeds are the fewest a paired "
                        f"interval can use), got {seeds}.")
        decide = decide or {}
        if not isinstance(decide, dict) or set(decide) - {"margin", "confidence", "spending"}:
            raise _fail(path, "decide", "a mapping {margin, confidence, spending} is required, e.g. {margin: 0.005, "
                        "confidence: 0.95} (spending: obrien-fleming, the default; pocock; bonferroni).")
        spending = decide.get("spending", "obrien-fleming")
        if spending not in SPENDING:
            raise _fail(path, "decide.spending", f"one of {', '.join(SPENDING)} is required, got {spending!r}.")
        margin, confidence = decide.get("margin", 0.005), decide.get("confidence", 0.95)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
            raise _fail(path, "decide.margin", f"a difference >= 0 in the objective's units is required, got {margin!r}.")
        if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0.5 <= confidence < 1:
            raise _fail(path, "decide.confidence", f"a number in [0.5, 1) is required, got {confidence!r}.")
        race = RaceSpec(seeds["initial"], seeds["max"], float(margin), float(confidence), spending)
        return list(range(race.max)), race
    if decide is not None:
        raise _fail(path, "decide", "applies to adaptive seeds only; write seeds as {initial: 2, max: 8}.")
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise _fail(path, "seeds", "a non-empty list of integers is required, e.g. [0, 1, 2], or adaptive "
                    "{initial: 2, max: 8}.")
    return seeds, None


def make_pruner(name: str, epochs: int, args: dict | None = None):
    """The study's Optuna pruner. Pruners live in the driver and in every job's `load_study` alike
    (Optuna does not store them), so both build them here. It sees the kNN monitor, once per epoch."""
    import optuna

    args = dict(args or {})
    if name == "median":
        return optuna.pruners.MedianPruner(**{"n_startup_trials": 3, "n_warmup_steps": 1, **args})
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**{"min_resource": 1, "max_resource": epochs, **args})
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**{"min_resource": 1, **args})
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(**args)
    return optuna.pruners.NopPruner()


def validate_levels(study: Study, recipe: str | None, extra: list[str]) -> tuple[list[tuple[dict, RunConfig]], list[str]]:
    """Build the run config of every grid point now, so an impossible level fails before submission.

    Returns (points, notes). Levels that are well-formed but that a mechanism cannot take are not
    run, and each is noted once (see `skipped_levels`; the report shows them as such)."""
    out, notes = [], []
    for params, cfg, reason in _grid_configs(study, recipe, extra):
        if reason is None:
            out.append((params, cfg))
        elif reason not in notes:
            notes.append(reason)
    if not out:
        raise StudyError(f"{study.path}: no level can run with recipe '{recipe or study.recipe}' ({'; '.join(notes)}).")
    return out, notes


def skipped_levels(study: Study, recipe: str | None, extra: list[str]) -> list[tuple[dict, str]]:
    """The grid's levels (factor values, no seed) that are not run, each with why: what a report
    shows in their place."""
    skipped: dict[str, tuple[dict, str]] = {}
    for params, _, reason in _grid_configs(study, recipe, extra):
        if reason is not None:
            level = {k: v for k, v in params.items() if k != "seed"}
            skipped.setdefault(trial_key(level), (level, reason))
    return list(skipped.values())


def _grid_configs(study: Study, recipe: str | None, extra: list[str]):
    """(params, config, why it is not run or None) for every grid point; ConfigError -> StudyError."""
    from harness.run.datafiles import pretrain_size

    points = study.grid() if study.sampler == "grid" else [_search_corners(study)]
    for params in points:
        try:
            cfg = study.run_config(params, recipe, extra)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            raise StudyError(f"{study.path}: the level ({shown}) cannot run with recipe "
                             f"'{recipe or study.recipe}': {exc}") from None
        yield params, cfg, _not_run(params, cfg, recipe or study.recipe, pretrain_size(cfg))


def _not_run(params: dict, cfg: RunConfig, recipe: str, size: int | None) -> str | None:
    """Why a well-formed level is not run, or None. Asked for K, two mechanisms cannot take every K:
    a queue (or bank draw) larger than the pretraining set would hold several keys of one image (a
    known trap on CIFAR with K = 65536), and end-to-end's negatives are the batch itself (the paper's
    Fig. 3: its K is the batch size; set optim.batch_size to move it)."""
    if "moco.queue_size" not in params:
        return None
    k = cfg.moco.queue_size
    if mechanism(cfg.moco.key_encoder).k_is_batch and k != cfg.optim.batch_size:
        return (f"key_encoder=end_to_end at K={k}: not run, its negatives are the batch (K = optim.batch_size "
                f"= {cfg.optim.batch_size})")
    if size is not None and k > size:
        return f"K={k} skipped: larger than the {size} pretraining images of recipe '{recipe}'"
    return None


def _search_corners(study: Study) -> dict:
    """One representative point of a search space (its low corner), to validate keys early."""
    params = {}
    for key, spec in study.factors.items():
        if isinstance(spec, dict) and spec.get("type") in ("float", "int"):
            params[key] = spec["low"]
        else:
            params[key] = (spec["choices"] if isinstance(spec, dict) else spec)[0]
    params["seed"] = study.seeds[0]
    return params
