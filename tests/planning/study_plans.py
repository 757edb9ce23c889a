"""Each study file of the repository as a plan: its points (trial keys), seeds, race, sampler, objective,
and the resources a trial asks for. `python tests/planning/study_plans.py > tests/fixtures/study-plans.json`
writes the snapshot that tests/planning/test_study_plans.py compares with (made before the study files'
parser moved to the config's typed coercion: the plans must not change with it)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harness.planning.studyfile import load_study_file, trial_key  # noqa: E402


def study_files() -> list[Path]:
    files = sorted((ROOT / "studies").glob("*.yaml")) + sorted((ROOT / "results" / "examples").glob("**/study.yaml"))
    return [f for f in files if not _is_suite(f)]


def _is_suite(path: Path) -> bool:
    import yaml

    return "suite" in (yaml.safe_load(path.read_text()) or {})


def plan(path: Path) -> dict:
    name = path.stem if path.name != "study.yaml" else path.parent.name
    study = load_study_file(path, name)
    out = {"sampler": study.sampler, "objective": study.objective, "direction": study.direction,
           "seeds": study.seeds, "factors": study.factors, "overrides": study.overrides, "recipe": study.recipe,
           "pruner": [study.pruner, study.pruner_args], "retries": study.retries, "n_trials": study.n_trials,
           "race": dataclasses.asdict(study.race) if study.race else None,
           "resources": dataclasses.asdict(study.resources_for())}
    if study.sampler == "grid":
        out["points"] = [trial_key(p) for p in study.grid()]
    return out


def plans() -> dict:
    return {str(path.relative_to(ROOT)): plan(path) for path in study_files()}


if __name__ == "__main__":
    print(json.dumps(plans(), indent=1, sort_keys=True, default=str))
