"""Every study file of the repository (studies/ and the committed examples' copies) gives the plan it
gave when tests/fixtures/study-plans.json was written: the same points, seeds, race, objective and
resources. Regenerate the file only for a change that means to alter a plan (and say so)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_plans  # noqa: E402

SNAPSHOT = Path(__file__).resolve().parents[1] / "fixtures" / "study-plans.json"


@pytest.fixture
def no_cluster_file(monkeypatch, tmp_path):
    monkeypatch.delenv("HARNESS_CLUSTER", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/harness/cluster.yaml of the machine's


def test_each_study_file_gives_the_plan_it_gave(no_cluster_file):
    before = json.loads(SNAPSHOT.read_text())
    now = json.loads(json.dumps(study_plans.plans(), sort_keys=True, default=str))
    assert sorted(now) == sorted(before), "a study file was added or removed: regenerate the snapshot"
    for path in before:
        assert now[path] == before[path], path
