"""A real MLflow tracking server on loopback (`mlflow server`, SQLite backend, artifacts served),
stopped and started again on the same port and store, as a lab's server goes down and comes back."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from timing import hang_s, wait_until


def available() -> bool:
    return shutil.which("mlflow") is not None or _importable()


def _importable() -> bool:
    try:
        import mlflow.server  # noqa: F401
    except ImportError:
        return False
    return True


class LocalMlflow:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def port_free(self) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                return False
        return True

    def start(self) -> LocalMlflow:
        wait_until(self.port_free, f"port {self.port} to be free for the MLflow server")
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            # Tracking needs none of MLflow's server-side jobs: their consumers are 7 Python processes a start.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_until(self.healthy, f"the MLflow server on port {self.port} (log: {self.root / 'server.log'})")
        return self

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """The whole server (uvicorn and its worker), as a crash or a maintenance stop would."""
        if self.process is None:
            return
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=hang_s())
        self.process = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)
