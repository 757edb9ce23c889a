"""A real PostgreSQL server from Debian's packages, on loopback, in one private directory.

Runs as the 'postgres' user (the server refuses root), started with pg_ctl and stopped by the PID
in postmaster.pid.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from processes import wait_exited
from timing import hang_s

PACKAGES = ["postgresql"]  # tests/apt-packages.txt


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available() -> bool:
    return bool(_bin("initdb") and _bin("pg_ctl")) and _has_user("postgres")


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class LocalPostgres:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.password = "pw-" + os.urandom(6).hex()

    def url(self, db: str = "optuna") -> str:
        return f"postgresql://harness:{self.password}@127.0.0.1:{self.port}/{db}"

    def _as_postgres(self, *args: str) -> None:
        proc = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=hang_s())
        if proc.returncode != 0:
            raise RuntimeError(f"local postgres: {args[0]} failed: {proc.stderr.strip()[-1500:]}")

    def start(self) -> LocalPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres", "postgres")
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        self._as_postgres(_bin("initdb"), "-D", str(self.data), "-U", "harness", f"--pwfile={pwfile}",
                          "--auth=scram-sha-256")
        self.restart()
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run([_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "harness",
                        "optuna"], check=True, env=env, capture_output=True, timeout=hang_s())
        return self

    def restart(self) -> None:
        """Start the server on its existing data directory (after start() made it, or after stop())."""
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "start",
                          "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200")

    def stop(self) -> None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().split()[0])
        if Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "postgres":
            os.kill(pid, signal.SIGINT)  # "fast" shutdown
            wait_exited(pid, 30)
