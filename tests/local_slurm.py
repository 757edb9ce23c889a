"""A real single-node Slurm cluster with accounting, in one private directory.

munged + MariaDB + slurmdbd + slurmctld + slurmd from Debian's packages (Slurm 22.05), all
configured through files under DIR and stopped by the PIDs they wrote. Used by the test suite;
also by hand:

    python tests/local_slurm.py start DIR     # prints: export SLURM_CONF=DIR/slurm.conf
    python tests/local_slurm.py stop DIR
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from processes import wait_exited
from timing import hang_s

DAEMONS = ["slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"]  # stop order
PACKAGES = ["munge", "slurm-client", "slurmctld", "slurmd", "slurmdbd", "mariadb-server"]  # tests/apt-packages.txt


def available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float | None = None) -> None:
    deadline = time.monotonic() + (timeout or hang_s())
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"local slurm: timed out waiting for {what}")


def _run(*args: str, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=hang_s())
    if proc.returncode != 0:
        raise RuntimeError(f"local slurm: {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def start_munge(r: Path) -> Path:
    """munged with a fresh key under r/munge-key, its socket, pid, log and seed under r/run and r/log;
    returns the socket (a path socket: any network namespace on this machine reaches it)."""
    key = r / "munge-key" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    os.chown(key, 0, 0)
    socket_path = r / "run" / "munge.socket"
    _run("munged", f"--socket={socket_path}", f"--key-file={key}", f"--pid-file={r / 'run/munged.pid'}",
         f"--log-file={r / 'log/munged.log'}", f"--seed-file={r / 'run/munged.seed'}", "--force")
    _wait(socket_path.exists, "munged")
    return socket_path


class LocalSlurm:
    ACCOUNT, QOS, GPUS, FEATURE = "lab", "short", 2, "a100"  # what the cluster enforces and declares (_start_slurm)

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -------------------------------------------------------------- start
    def start(self) -> LocalSlurm:
        r = self.root
        for sub in ("state", "spool", "log", "run", "munge-key"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge-key").chmod(0o700)
        (r / "run").chmod(0o755)
        self._start_munge()
        self._start_mariadb()
        self._start_slurm()
        return self

    def _start_munge(self) -> None:
        self.munge_socket = start_munge(self.root)

    def _start_mariadb(self) -> None:
        r = self.root
        data = r / "mysql"
        data.mkdir(exist_ok=True)
        shutil.chown(data, "mysql", "mysql")
        _run("mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={data}", "--auth-root-authentication-method=socket")
        run = r / "mysql-run"  # mariadbd runs as 'mysql': its socket and PID file live apart
        run.mkdir(exist_ok=True)
        shutil.chown(run, "mysql", "mysql")
        self.db_port, self.db_socket = _free_port(), run / "mysql.sock"
        log = open(r / "log" / "mariadb.log", "ab")
        proc = subprocess.Popen(["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={data}",
                          f"--socket={self.db_socket}", "--bind-address=127.0.0.1", f"--port={self.db_port}",
                          f"--pid-file={run / 'mariadbd.pid'}", "--skip-name-resolve"],
                                stdout=log, stderr=log, start_new_session=True)
        _wait(lambda: self.db_socket.exists() or proc.poll() is not None, "mariadbd")
        if proc.poll() is not None:
            raise RuntimeError(f"local slurm: mariadbd exited; see {r / 'log/mariadb.log'}")
        self.db_password = secrets.token_hex(12)
        sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}';"
               f"CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{self.db_password}';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;")
        _run("mariadb", "--no-defaults", f"--socket={self.db_socket}", "-u", "root", "-e", sql)

    def _start_slurm(self) -> None:
        r = self.root
        host = socket.gethostname().split(".")[0]
        self.dbd_port, ctld_port, slurmd_port = _free_port(), _free_port(), _free_port()
        dbd = r / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={self.dbd_port}", "SlurmUser=root",
            f"PidFile={r / 'run/slurmdbd.pid'}", f"LogFile={r / 'log/slurmdbd.log'}",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={self.db_port}",
            "StorageUser=slurm", f"StoragePass={self.db_password}", "StorageLoc=slurm_acct_db", ""]))
        dbd.chmod(0o600)
        self.conf.write_text("\n".join([
            "ClusterName=harness", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}", "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run/slurmctld.pid'}", f"SlurmdPidFile={r / 'run/slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd.log'}",
            # CPU binding as on real clusters: a task sees only the cores it was given.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity", "JobAcctGatherType=jobacct_gather/none",
            # Accounts and QOS enforced as on most sites: a job needs a valid account, QOS and limits.
            "AccountingStorageEnforce=associations,limits,qos", "GresTypes=gpu",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.dbd_port}", f"AccountingStoragePass={self.munge_socket}",
            "SchedulerParameters=bf_interval=2,sched_interval=2", "ReturnToService=2", "KillWait=2",
            "MinJobAge=300", "MailProg=/bin/true", "MpiDefault=none", "JobRequeue=1",
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny", "SlurmdParameters=config_overrides",
            # The machine's real cores: jobs that fit run at once, no more (as on a real node).
            # Two GPUs declared on stand-in device files (/dev/null, /dev/zero): gres and --gpus requests are
            # accepted and scheduled, and a job can read what it was given; nothing can compute on them.
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=16000 Gres=gpu:{self.GPUS} Features={self.FEATURE} "
            f"State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName=long Nodes={host} MaxTime=INFINITE State=UP", ""]))
        (r / "gres.conf").write_text("".join(f"NodeName={host} Name=gpu File={device}\n"
                                             for device in ("/dev/null", "/dev/zero")[:self.GPUS]))
        _run("slurmdbd", env=self.env)
        _wait(lambda: self._port_open(self.dbd_port), "slurmdbd")
        _wait(lambda: subprocess.run(["sacctmgr", "-i", "add", "cluster", "harness"], env=self.env,
                                     capture_output=True).returncode == 0, "sacctmgr add cluster")
        # A lab account and a short QOS next to the default ones: studies may name them, others are refused.
        for command in (["add", "qos", self.QOS, "MaxWall=02:00:00"],
                        ["add", "account", self.ACCOUNT, "Cluster=harness", "Description=lab", "Organization=lab"],
                        ["add", "user", "root", f"Account={self.ACCOUNT}", "Cluster=harness"],
                        ["modify", "user", "root", "set", f"QOS=normal,{self.QOS}", "DefaultQOS=normal"]):
            _run("sacctmgr", "-i", *command, env=self.env)
        _run("slurmctld", env=self.env)
        _run("slurmd", env=self.env)
        _wait(self._node_idle, "the node to become idle")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=hang_s())
        for name in DAEMONS:
            self.stop_daemon(name)

    def stop_daemon(self, name: str) -> None:
        """SIGTERM one daemon by the PID in its pid file (SIGKILL after 20 s)."""
        pidfile = self.root / ("mysql-run" if name == "mariadbd" else "run") / f"{name}.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (ValueError, OSError, IndexError):
            return
        if comm != name[:15]:  # the PID was reused: not ours
            return
        os.kill(pid, 15)
        if not wait_exited(pid, 20):
            os.kill(pid, 9)

    def restart_controller(self) -> None:
        """slurmctld again, from its saved state (running jobs are recovered, as after maintenance)."""
        _run("slurmctld", env=self.env)
        _wait(self._node_idle, "the controller to answer again")


if __name__ == "__main__":
    action, directory = sys.argv[1], Path(sys.argv[2])
    cluster = LocalSlurm(directory)
    if action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
