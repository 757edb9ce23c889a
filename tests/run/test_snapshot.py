"""Jobs run the code of their submission: a snapshot of harness/ and studies/, imported first."""
import os
import shutil

import submitit

from harness.run import snapshot


def test_snapshot_is_taken_once_per_content_version(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(snapshot.CODE_ROOT / "harness", root / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(snapshot.CODE_ROOT / "studies", root / "studies")
    first = snapshot.take(tmp_path / "code", root)
    assert (first / "harness" / "model" / "moco.py").read_bytes() == (root / "harness" / "model" / "moco.py").read_bytes()
    assert (first / "studies" / "recipes" / "fmnist-tiny.yaml").is_file()
    assert snapshot.take(tmp_path / "code", root) == first  # unchanged code: the same snapshot
    (root / "studies" / "recipes" / "fmnist-tiny.yaml").write_text("data: {}\n")  # an edit after submitting
    second = snapshot.take(tmp_path / "code", root)
    assert second != first and (first / "studies" / "recipes" / "fmnist-tiny.yaml").read_text() != "data: {}\n"
    assert sorted(p.name for p in (tmp_path / "code").iterdir()) == sorted([first.name, second.name])


def test_a_submitted_job_imports_the_snapshot_not_the_live_tree(tmp_path):
    code = snapshot.take(tmp_path / "code")
    before = (os.getcwd(), os.environ.get("PYTHONPATH"))
    executor = submitit.AutoExecutor(folder=str(tmp_path / "jobs"), cluster="local")
    executor.update_parameters(timeout_min=2)
    with snapshot.jobs_use(code):
        job = executor.submit(snapshot.code_origin)
    assert (os.getcwd(), os.environ.get("PYTHONPATH")) == before  # the driver's own process is untouched
    assert job.result() == str(code)
    assert snapshot.code_origin() == str(snapshot.CODE_ROOT) != str(code)
