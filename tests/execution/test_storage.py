"""Cluster storages under concurrency: PostgreSQL with heartbeats (a worker SIGKILLed mid-trial),
a journal file with 4 workers while a second driver of the same study is refused."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from timing import hang_s

from harness.execution.storage import open_storage
from harness.run.runio import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
KEYS = sorted(f"momentum={m},seed={s}" for m in (0.9, 0.99) for s in (0, 1))
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def cmd(results: Path, storage: str, *args: str):
    env = {**os.environ, "HARNESS_RESULTS": str(results), "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "harness.study", "smoke", "--executor", "local", "--storage", storage,
            "--poll", "1", "--no-report", *args], env


def assert_each_key_complete_once(storage: str) -> list:
    trials = optuna.load_study(study_name="smoke", storage=open_storage(storage)).get_trials()
    done = sorted(t.user_attrs["key"] for t in trials if t.state == COMPLETE)
    assert done == KEYS, [(t.number, t.state.name, t.user_attrs.get("key")) for t in trials]
    return trials


@pytest.mark.slow
def test_postgres_workers_survive_a_killed_worker(tmp_path, postgres):
    url = postgres.url()
    args, env = cmd(tmp_path, url, "--workers", "2", "--heartbeat", "2")
    driver = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "smoke" / "runs"
    victim = None
    deadline = time.monotonic() + hang_s()
    while victim is None and time.monotonic() < deadline:  # a worker with a trial under way
        for run in sorted(runs.glob("*")) if runs.exists() else []:
            steps = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "step"]
            attempts = read_jsonl(run / "attempts.jsonl")
            if steps and attempts and not (run / "status.json").read_text().count("completed"):
                victim = (run.name, attempts[-1]["pid"])
                break
        time.sleep(0.2)
    assert victim, "no trial got under way"
    os.kill(victim[1], signal.SIGKILL)
    output, _ = driver.communicate(timeout=hang_s())
    assert driver.returncode == 0, output[-3000:]
    assert postgres.password not in output  # never printed
    trials = assert_each_key_complete_once(url)
    stale = [t for t in trials if t.state == FAIL]
    assert [t.user_attrs["key"] for t in stale] == [victim[0]]  # failed by heartbeat, then retried
    assert len(read_jsonl(runs / victim[0] / "attempts.jsonl")) == 2


@pytest.mark.slow
def test_two_drivers_started_at_once_on_a_journal_file_with_two_workers(tmp_path):
    """Two drivers of one study started at the same moment: one runs it (two worker-mode workers on a
    journal file, two trials each), the other is refused at once; every trial completes exactly once.
    (One smoke study for both mechanisms: the lock and the journal under concurrent workers.)"""
    url = f"journal://{tmp_path / 'smoke.journal'}"
    args, env = cmd(tmp_path, url, "--workers", "2")
    first = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=hang_s()) for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 2], outs
    assert any("another driver is already running" in err for _, err in outs)
    trials = assert_each_key_complete_once(url)
    assert len(trials) == 4


def test_studies_opened_at_once_on_a_new_sqlite_file(tmp_path):
    """The same race on SQLite: "table studies already exists" for the loser (seen when a test polled
    the storage of a driver that was still creating it; a `--status` while a driver starts is the
    same). Six openers at once, three new files (each round failed before the fix)."""
    import threading

    for round_ in range(3):
        url, errors, start = f"sqlite:///{tmp_path / f'round{round_}' / 'study.db'}", [], threading.Barrier(6)

        def open_one(url=url, errors=errors, start=start):
            start.wait()
            try:
                open_storage(url, None)
            except Exception as exc:  # noqa: BLE001 - the test reports whatever an opener met
                errors.append(exc)

        threads = [threading.Thread(target=open_one) for _ in range(6)]
        [t.start() for t in threads]
        [t.join(timeout=hang_s()) for t in threads]
        assert errors == []
        optuna.create_study(study_name="after", storage=open_storage(url, None))  # the schema is whole


def test_studies_opened_at_once_on_a_new_postgres_database(postgres):
    """The first use of an empty database creates Optuna's schema, and two processes doing it at once
    collided (one study died: "cannot open (IntegrityError ... pg_type_typname_nsp_index)"), e.g. two
    studies launched together on a new database. Six openers at once, on a database of their own."""
    import threading

    import psycopg

    admin = psycopg.connect(host="127.0.0.1", port=postgres.port, user="harness", password=postgres.password,
                            dbname="optuna", autocommit=True)
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE fresh_schema_race")
    admin.close()
    url, errors, start = postgres.url("fresh_schema_race"), [], threading.Barrier(6)

    def open_one(heartbeat):
        start.wait()
        try:
            open_storage(url, heartbeat)
        except Exception as exc:  # noqa: BLE001 - the test reports whatever an opener met
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(hb,)) for hb in (None, 30) * 3]
    [t.start() for t in threads]
    [t.join(timeout=hang_s()) for t in threads]
    assert errors == []
    optuna.create_study(study_name="after", storage=open_storage(url, None))  # the schema is whole


def test_the_readmes_postgresql_url_opens_with_the_projects_extra(postgres):
    """The README's cluster example spells `postgresql://` (no driver): SQLAlchemy 2.1 reads it as
    psycopg 3, which the `postgres` extra installs (psycopg2 alone failed: "Failed to import DB access
    module"). The test server's URL in that form, opened as the driver opens it."""
    import re

    import tomllib

    assert re.findall(r"--storage (postgresql[^:]*)://", (ROOT / "README.md").read_text()) == ["postgresql"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("psycopg[binary]") for req in extras["postgres"])
    url = postgres.url()
    assert url.startswith("postgresql://")
    storage = open_storage(url, heartbeat_s=None)
    assert storage.engine.dialect.driver == "psycopg"
    optuna.create_study(study_name="readme-form", storage=storage, load_if_exists=True)
