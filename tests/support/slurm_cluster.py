"""A real one-node SLURM cluster on localhost for the `slurm` tests.

Installs Debian's slurmctld, slurmd, slurm-client and munge when missing (apt-get; needs
root), writes a minimal localhost slurm.conf into a temp dir, starts munged,
slurmctld and slurmd in the foreground as our own children, waits for the node to be idle,
and stops them by pid afterwards. Everything (munge socket and key, ports, state) is private
to the temp dir, so it never touches a system SLURM or munge.

Clients find the cluster through SLURM_CONF, which `cluster.env()` sets; tests/conftest.py
registers the `slurm_cluster` fixture.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from tests.support.env import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged"]

# {nodes}: the NodeName and PartitionName lines; %n in a path is the node's name (one slurmd each).
SLURM_CONF = """\
ClusterName=dftest
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
# cred_expire: a requeued job becomes eligible cred_expire+1 s later (default 120).
AuthInfo=socket={dir}/munge.socket,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/ctld.pid
SlurmdPidFile={dir}/d-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node may declare fewer CPUs than the machine has (the two-node cluster shares its cores).
SlurmdParameters=config_overrides
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# Keep finished jobs visible to scontrol for the whole test session (no accounting here).
MinJobAge=3600
# Jobs derive MASTER_PORT from their id: a random first id keeps two test clusters on one
# machine (parallel CI runs) from handing the same port to jobs running at the same time.
FirstJobId={first_job_id}
KillWait=30
# Preemption as sites configure it: a job of the `urgent` partition requeues the jobs of `debug`
# it needs the cores of, after GraceTime seconds in which their tasks have SIGTERM.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
"""
ONE_NODE = """\
NodeName={host} CPUs={cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"""


def ensure_installed() -> None:
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        pytest.fail(f"SLURM tests need {', '.join(PACKAGES)}: apt-get install them (as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True)


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    def __init__(self, cpus: int = 2) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dfslurm-"))  # short: munge socket path limit
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.conf = self.dir / "slurm.conf"
        self.procs: List[subprocess.Popen] = []

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(base if base is not None else os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self) -> "LocalSlurm":
        self._start_controller(self.host, ONE_NODE.format(host=self.host, cpus=self.cpus), [self.host])
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf)], "slurmd.out")
        self._wait_for(lambda: self._run(["sinfo", "-h", "-o", "%t"]).stdout.strip() == "idle", "node idle")
        return self

    def _start_controller(self, ctld_host: str, nodes: str, node_names: List[str]) -> None:
        """slurm.conf, the munge key, munged and slurmctld; the caller starts the slurmd."""
        (self.dir / "state").mkdir()
        for name in node_names:
            (self.dir / f"spool-{name}").mkdir()
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(SLURM_CONF.format(
            ctld_host=ctld_host, dir=self.dir, ctld_port=free_port(), d_port=free_port(),
            first_job_id=random.randrange(1000, 1_000_000), nodes=nodes,
        ))
        munged = [
            _binary("munged"), "--foreground", "--force", f"--socket={self.dir}/munge.socket",
            f"--key-file={key}", f"--pid-file={self.dir}/munged.pid", f"--log-file={self.dir}/munged.log",
            f"--seed-file={self.dir}/munged.seed",
        ]
        self._spawn(munged, "munged.out")
        self._wait_for(lambda: (self.dir / "munge.socket").exists(), "munged socket")
        self._spawn([_binary("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld.out")
        self._wait_for(lambda: self._run(["scontrol", "ping"]).returncode == 0, "slurmctld")

    def stop(self) -> None:
        self._end_jobs()
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged: by the pids we started
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _end_jobs(self, timeout: float = 60) -> None:
        """Cancel the jobs a failed test left queued or running: their batch scripts and ranks
        would outlive the daemons. SLURM gives them KillWait (30 s) after SIGTERM."""
        if not self.procs or any(p.poll() is not None for p in self.procs):
            return
        jobs = self._run(["squeue", "-h", "-o", "%i"]).stdout.split()
        if not jobs:
            return
        self._run(["scancel", *jobs])
        deadline = time.time() + timeout
        while self._run(["squeue", "-h", "-o", "%i"]).stdout.split() and time.time() < deadline:
            time.sleep(1)

    def _spawn(self, cmd: List[str], log: str) -> None:
        out = open(self.dir / log, "w")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env()))

    def _run(self, cmd: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env())

    def _wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.5)
        logs = "".join(
            f"\n--- {p.name}\n" + p.read_text()[-1500:] for p in sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("*.log"))
        )
        self.stop()
        pytest.fail(f"local SLURM: {what} not ready after {timeout:.0f}s{logs}")

    # -- queries the tests use -----------------------------------------------------------------
    def job_info(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` fields (JobState, StartTime, EndTime, Restarts, ExitCode, ...)."""
        text = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def wait_jobs(self, job_ids: List[str], timeout: float) -> Dict[str, Dict[str, str]]:
        """Wait until every job left the queue; returns their final scontrol fields."""
        deadline = time.time() + timeout
        done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
        while time.time() < deadline:
            infos = {j: self.job_info(j) for j in job_ids}
            states = {j: i.get("JobState") for j, i in infos.items()}
            if all(s in done for s in states.values()):
                return infos
            if any(s in done - {"COMPLETED"} for s in states.values()):
                return infos  # something failed: the dependents never start
            time.sleep(2)
        raise AssertionError(f"jobs not finished after {timeout:.0f}s: {states}")


class TwoNodeSlurm(LocalSlurm):
    """Two SLURM nodes on this machine: each slurmd runs in a network namespace of its own with its
    own address on a private bridge (10.<a>.<b>.0/24), slurmctld in this namespace on the bridge's
    address. Node names resolve on the nodes through a hosts file mounted over /etc/hosts in a
    mount namespace of each slurmd (inherited by its jobs; the machine's /etc/hosts is not
    touched), so a job's rendezvous (MASTER_ADDR = the first host of the node list) goes from one
    namespace to the other as between two machines. The filesystem is shared, as a cluster's is.
    stop() removes the daemons, namespaces and links, also after a failed start."""

    IFNAME = "dfeth0"  # each node's interface, inside its namespace

    def __init__(self) -> None:
        super().__init__(cpus=1)
        tag = f"{random.randrange(16**4):04x}"
        self.bridge = f"dfbr{tag}"
        a, b = random.randrange(16, 32), random.randrange(256)
        self.subnet = f"10.{a}.{b}"
        self.ctld_addr = f"{self.subnet}.1"
        self.nodes = {f"dfn{tag}a": f"{self.subnet}.11", f"dfn{tag}b": f"{self.subnet}.12"}
        self.netns = {name: f"dfns-{name}" for name in self.nodes}
        self.made: List[List[str]] = []  # commands that undo what start() made, run in reverse

    def start(self) -> "TwoNodeSlurm":
        if os.geteuid() != 0 or not shutil.which("ip"):
            pytest.fail("the two-node SLURM tests need root and iproute2 (ip netns)")
        try:
            self._make_network()
        except subprocess.CalledProcessError as e:
            self.stop()
            pytest.fail(f"two-node SLURM: {' '.join(e.cmd)} failed: {e.stderr}")
        nodes = "\n".join(f"NodeName={n} NodeAddr={addr} NodeHostname={n} CPUs=1 RealMemory=8000 State=UNKNOWN"
                          for n, addr in self.nodes.items())
        nodes += f"\nPartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"
        self._start_controller(f"{self.host}({self.ctld_addr})", nodes, list(self.nodes))
        for name, ns in self.netns.items():
            # The network namespace, a host name and a private /etc/hosts (`ip netns exec` would
            # also remount /sys, where slurmd needs the machine's cgroup filesystem).
            slurmd = (f"hostname {name} && mount --bind {self.dir / 'hosts'} /etc/hosts && "
                      f"exec {_binary('slurmd')} -D -N {name} -f {self.conf}")
            self._spawn(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation", "private",
                         "sh", "-c", slurmd], f"slurmd-{name}.out")
        self._wait_for(lambda: self._run(["sinfo", "-h", "-o", "%t"]).stdout.split() == ["idle"], "both nodes idle")
        return self

    def _make_network(self) -> None:
        def ip(*args: str, undo: Optional[List[str]] = None) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
            if undo:
                self.made.append(undo)

        ip("link", "add", self.bridge, "type", "bridge", undo=["ip", "link", "del", self.bridge])
        ip("addr", "add", f"{self.ctld_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        # The nodes' /etc/hosts, mounted over the real one in their own mount namespace only.
        (self.dir / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in self.nodes.items()))
        for i, (name, addr) in enumerate(self.nodes.items()):
            ns, outside = self.netns[name], f"{self.bridge}v{i}"
            ip("netns", "add", ns, undo=["ip", "netns", "del", ns])
            ip("link", "add", outside, "type", "veth", "peer", "name", self.IFNAME, "netns", ns,
               undo=["ip", "link", "del", outside])
            ip("link", "set", outside, "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.IFNAME)
            ip("-n", ns, "link", "set", self.IFNAME, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def stop(self) -> None:
        super().stop()
        for cmd in reversed(self.made):
            subprocess.run(cmd, capture_output=True)
        self.made.clear()
