import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/local_slurm.py

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
