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

SLURM_CONF = """\
ClusterName=dftest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
# cred_expire: a requeued job becomes eligible cred_expire+1 s later (default 120).
AuthInfo=socket={dir}/munge.socket,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/ctld.pid
SlurmdPidFile={dir}/d.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
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
NodeName={host} CPUs={cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


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
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, dir=self.dir, cpus=self.cpus, ctld_port=free_port(), d_port=free_port(),
            first_job_id=random.randrange(1000, 1_000_000),
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
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf)], "slurmd.out")
        self._wait_for(lambda: self._run(["sinfo", "-h", "-o", "%t"]).stdout.strip() == "idle", "node idle")
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged: by the pids we started
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

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
