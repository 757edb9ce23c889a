import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/local_slurm.py, tests/local_postgres.py

import faces  # noqa: E402
import local_mlflow  # noqa: E402
import local_postgres  # noqa: E402
import local_slurm  # noqa: E402
import timing  # noqa: E402
import two_node_slurm  # noqa: E402

# The suite runs several pytest workers, each with jobs of its own, on few cores: more OpenMP threads than
# cores. By default an idle OpenMP thread spins before it sleeps, and processes spinning against each
# other ran a training 2-8x slower (measured in the README). PASSIVE makes waiting threads sleep;
# thread counts, and so every number a test computes, are unchanged. Set before torch loads (the test
# modules import it after this file); the jobs the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One thread where a test leaves torch's default (work in the pytest workers, `harness.train` runs
# without runtime.threads): two workers already share the 2 cores with their jobs, and a second thread per process
# only adds synchronisation. Trials of studies get their share from the driver, as on a cluster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ALLOW_SKIP = "HARNESS_ALLOW_SKIP"  # =1: a machine without the servers may skip their tests (never in CI)


def _require(installed: bool, what: str, packages: list[str], install: str | None = None) -> None:
    """Fail when a package the tests need is missing, unless skipping was asked for explicitly
    (outside CI): a green run must not hide that the cluster tests never ran."""
    if installed:
        return
    install = install or f"apt-get install {' '.join(packages)} (tests/apt-packages.txt; the README's test command does it)"
    if os.environ.get(ALLOW_SKIP) == "1" and not os.environ.get("CI"):
        pytest.skip(f"{what} is not installed and {ALLOW_SKIP}=1: skipped ({install})")
    pytest.fail(f"{what} is not installed: {install}, or set {ALLOW_SKIP}=1 to skip these tests knowingly.")


def pytest_configure(config):
    """The process that collects (a worker, or pytest itself without workers) does it with the garbage
    collector paused, as the harness's own processes start (harness.run.process); collection's end
    freezes what it imported and resumes it.
    This machine's speed (what the few times set against the machine's work scale by) is measured
    once per test run, by the first worker that needs it; the file they share is made here, in the
    process that starts them (they inherit its name)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        from harness.run import process

        process.pause_collection()
    if not os.environ.get("PYTEST_XDIST_WORKER") and timing.SPEED_ENV not in os.environ:
        fd, path = tempfile.mkstemp(prefix="harness-test-speed-")
        os.close(fd)
        os.environ[timing.SPEED_FILE_ENV] = path


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(timing.SPEED_FILE_ENV):
        Path(os.environ.pop(timing.SPEED_FILE_ENV)).unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    speed = timing.shared_speed()
    if speed is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        terminalreporter.write_line(f"machine speed: {speed}x slower than the reference (tests/timing.py; waits end "
                                    f"at {timing.hang_s():.0f} s)")


def pytest_collection_finish(session):
    """What collection imported (torch, the harness, every test module) lives as long as the worker:
    out of the garbage collector's full scans, as in the harness's own processes (harness.run.process)."""
    from harness.run import process

    process.freeze_imports()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the suite runs on two workers), every test of one server runs in the worker
    that started it: the Slurm tests in one group, the PostgreSQL tests in another (each stops or
    restarts its server, and a session fixture starts one server per worker). Tests sharing an
    expensive module-scoped fixture (the crash matrix's reference run) stay together too, so it is
    computed once."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        server = next((s for s in ("slurm", "postgres") if s in names), None)
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        shared = any(d and d[-1].scope == "module" for d in defs.values())
        if server or shared:
            item.add_marker(pytest.mark.xdist_group(server or item.module.__name__))
    # Longest first: xdist hands out the groups with most tests first, then single tests in this order;
    # a slow end-to-end test picked up last would leave the other workers idle while it runs.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    """Under CI a skipped test is a failure: CI installs everything, so a skip means a test did not run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; under CI every test must run.", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The harness cache (raw-pixel floors, timed steps, decompressed datasets) of this test run's own,
    never the user's ~/.cache/harness; jobs inherit it. One for the run's workers, in the directory
    they share: what one measured the other reads (its entries are written whole, harness.run.runio)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "harness-cache"
    cache.mkdir(exist_ok=True)
    os.environ["HARNESS_CACHE"] = str(cache)


@contextmanager
def _service_dir(prefix: str):
    """A private directory outside pytest's tmp dir (that is 0700, and these servers run as their
    own users: mysql, postgres), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    """A real single-node Slurm with accounting for the whole session, stopped by PID afterwards."""
    _require(local_slurm.available(), "Slurm", local_slurm.PACKAGES)
    with _service_dir("harness-slurm-") as root:
        cluster = local_slurm.LocalSlurm(root)
        try:
            yield cluster.start()
        finally:
            cluster.stop()


@pytest.fixture
def two_nodes():
    """A real two-node Slurm (a slurmd per network namespace, no accounting), for one test."""
    _require(two_node_slurm.available(), "Slurm", local_slurm.PACKAGES)
    with _service_dir("harness-2nodes-") as root:
        cluster = two_node_slurm.TwoNodeSlurm(root)
        try:
            yield cluster.start()
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session, stopped by PID afterwards."""
    _require(local_postgres.available(), "PostgreSQL", local_postgres.PACKAGES)
    with _service_dir("harness-pg-") as root:
        server = local_postgres.LocalPostgres(root / "pg")
        try:
            yield server.start()
        finally:
            server.stop()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback for one test (it stops and restarts it)."""
    _require(local_mlflow.available(), "MLflow", [], "pip install -e '.[test]' (the test extra has mlflow)")
    server = local_mlflow.LocalMlflow(tmp_path / "mlflow")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def harness_cli(monkeypatch):
    """`python -m harness.NAME ARGS` in this process (faces.run_main), with `env` set for the call.
    A command that must be killed, needs its own environment for torch (threads, devices) or is what
    a person runs as a whole (the device check, the studies that run jobs) stays a subprocess; each
    face keeps at least one such test."""

    def run(name: str, *argv: str, env: dict | None = None) -> faces.CliResult:
        for key, value in (env or {}).items():
            monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
        return faces.run_main(name, list(argv))

    return run


@pytest.fixture
def study_cli(monkeypatch, harness_cli):
    """`python -m harness.study ARGS` in this process with results under `results`, for commands that
    only check their input or print a plan. Commands that run jobs, or must be killed, stay subprocesses."""
    from harness.run import runio

    def run(results: Path, *argv: str, env: dict | None = None) -> faces.CliResult:
        monkeypatch.setattr(runio, "RESULTS", Path(results))
        return harness_cli("study", *argv, env=env)

    return run


CPU_LOG = "HARNESS_TEST_CPU_LOG"  # a file: each test's CPU seconds appended (where the suite's time goes)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With HARNESS_TEST_CPU_LOG set, each test's CPU: this worker's own and that of the processes it
    waited for (drivers and the local jobs they reaped; jobs under slurmd and servers are not seen),
    and the worker's own alone (in_worker_s)."""
    path = os.environ.get(CPU_LOG)
    if not path:
        yield
        return
    import json
    import resource

    def spent() -> tuple[float, float]:
        own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, reaped.ru_utime + reaped.ru_stime

    own0, reaped0 = spent()
    yield
    own, reaped = spent()
    with open(path, "a") as log:
        log.write(json.dumps({"test": item.nodeid, "cpu_s": round(own + reaped - own0 - reaped0, 2),
                              "in_worker_s": round(own - own0, 2)}) + "\n")
