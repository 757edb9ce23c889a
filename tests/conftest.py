import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/local_slurm.py, tests/local_postgres.py

import local_postgres  # noqa: E402
import local_slurm  # noqa: E402


def _require(installed: bool, what: str, packages: list[str]) -> None:
    """Skip on a developer's machine without the packages; fail in CI, which must install them."""
    if installed:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed; .ci/run installs {' '.join(packages)} (tests/apt-packages.txt)")
    pytest.skip(f"{what} is not installed (apt-get install {' '.join(packages)})")


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
