import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/local_slurm.py

import local_postgres  # noqa: E402
from local_slurm import PACKAGES, LocalSlurm, available  # noqa: E402


@pytest.fixture(scope="session")
def slurm():
    """A real single-node Slurm with accounting for the whole session, stopped by PID afterwards."""
    if not available():
        if os.environ.get("CI"):
            pytest.fail(f"Slurm is not installed; .ci/run installs {' '.join(PACKAGES)}")
        pytest.skip(f"Slurm is not installed (apt-get install {' '.join(PACKAGES)})")
    # Not under pytest's tmp dir: that is 0700, and mariadbd runs as the 'mysql' user.
    root = Path(tempfile.mkdtemp(prefix="harness-slurm-"))
    root.chmod(0o755)
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session, stopped by PID afterwards."""
    if not local_postgres.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    root.chmod(0o755)
    server = local_postgres.LocalPostgres(root / "pg")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
