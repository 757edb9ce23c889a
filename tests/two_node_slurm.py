"""A real two-node Slurm cluster on one machine: two slurmd, each in a network namespace of its own.

Node n1 (with slurmctld) lives in namespace A, node n2 in namespace B, joined by a veth pair; the
addresses exist only inside the two namespaces, which `stop` deletes. Each node sees a hosts file of its
own as /etc/hosts (bind-mounted in a private mount namespace; nothing under /etc changes) naming n1, n2
and this machine's hostname as that node's address -- a real cluster's DNS -- so a job's first node name
works as the rendezvous address and gloo finds its interface.

Everything that must see the cluster runs inside namespace A (`cluster.exec(...)`): the commands, the
driver. No accounting (no slurmdbd), as on many lab clusters. By hand:

    python tests/two_node_slurm.py start DIR     # prints the prefix to run commands on n1
    python tests/two_node_slurm.py stop DIR
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from local_slurm import _run, _wait, available, start_munge  # noqa: F401  (available: same daemons minus the database)
from processes import wait_exited
from timing import hang_s

SUBNET = "10.231.7"  # exists only inside the two namespaces


class TwoNodeSlurm:
    NODES = ("n1", "n2")

    def __init__(self, root: Path, tag: str | None = None):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        tag = tag or str(os.getpid())
        self.namespaces = {"n1": f"hx{tag}a", "n2": f"hx{tag}b"}
        self.veth = f"hxv{tag}"[:15]
        self.address = {"n1": f"{SUBNET}.1", "n2": f"{SUBNET}.2"}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def exec(self, *command: str, node: str = "n1") -> list[str]:
        """`command` as run on `node`: in its network namespace, seeing its hosts file as /etc/hosts (in a
        private mount namespace; `ip netns exec` would do the same but remounts /sys without the cgroup
        tree slurmd needs)."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[node]}", "unshare", "--mount", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(self.root / f"hosts-{node}"), *command]

    # -------------------------------------------------------------- start
    def start(self) -> TwoNodeSlurm:
        r = self.root
        for sub in ("state", "log", "run", "munge-key", "spool-n1", "spool-n2"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge-key").chmod(0o700)
        (r / "run").chmod(0o755)
        self._network()
        self.munge_socket = start_munge(r)
        self._start_slurm()
        return self

    def _network(self) -> None:
        a, b = self.namespaces["n1"], self.namespaces["n2"]
        hostname = socket.gethostname()
        for node, ns in self.namespaces.items():
            _run("ip", "netns", "add", ns)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            (self.root / f"hosts-{node}").write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in self.address.items())
                             + f"{self.address[node]} {hostname} {hostname.split('.')[0]}\n")
        _run("ip", "link", "add", self.veth, "netns", a, "type", "veth", "peer", "name", self.veth + "p", "netns", b)
        _run("ip", "netns", "exec", b, "ip", "link", "set", self.veth + "p", "name", self.veth)
        for node, ns in self.namespaces.items():
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address[node]}/24", "dev", self.veth)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", self.veth, "up")

    def _start_slurm(self) -> None:
        r = self.root
        cpus = os.cpu_count()
        self.conf.write_text("\n".join([
            "ClusterName=harness2", f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.address['n1']})", "SlurmctldPort=6817",
            "SlurmdPort=6818", "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmctldPidFile={r / 'run/slurmctld.pid'}", f"SlurmdPidFile={r / 'run/slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerParameters=bf_interval=2,sched_interval=2", "ReturnToService=2", "KillWait=2",
            "MinJobAge=300", "MailProg=/bin/true", "MpiDefault=none", "JobRequeue=1",
            "SlurmdParameters=config_overrides",
            *(f"NodeName={n} NodeAddr={self.address[n]} CPUs={cpus} RealMemory=8000 State=UNKNOWN" for n in self.NODES),
            f"PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP", ""]))
        _run(*self.exec("slurmctld"), env=self.env)
        for node in self.NODES:
            _run(*self.exec("slurmd", "-N", node, node=node), env=self.env)
        _wait(self._nodes_idle, "both nodes to become idle")

    def _nodes_idle(self) -> bool:
        out = subprocess.run(self.exec("sinfo", "-h", "-N", "-o", "%N %t"), env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) in ("idle", "mix", "alloc") for n in self.NODES)

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        subprocess.run(self.exec("scancel", "--full", "--user=root"), env=self.env, capture_output=True, timeout=hang_s())
        for pidfile in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
            self._stop_pid(self.root / "run" / f"{pidfile}.pid")
        for ns in self.namespaces.values():  # deleting a namespace removes its veth end (and the pair)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    @staticmethod
    def _stop_pid(pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, 15)
        except (ValueError, OSError, IndexError):
            return
        if not wait_exited(pid, 20):
            os.kill(pid, 9)


if __name__ == "__main__":
    action, directory = sys.argv[1], Path(sys.argv[2])
    cluster = TwoNodeSlurm(directory, tag="manual")
    if action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}; {' '.join(cluster.exec('bash'))}")
    else:
        cluster.stop()
