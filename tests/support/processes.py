"""A launcher run started in the background, and the processes below it, for the tests that
interrupt runs the way a cluster does (kill -9 of one rank, a signal to every rank)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

from tests.support.env import REPO, free_port, offline_env


def descendants(pid: int) -> List[int]:
    """Every live process below `pid`, parents before children."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command name)"
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = sorted(children.get(todo.pop(0), []))
        found += below
        todo += below
    return found


def rank_process(launcher: int, rank: int) -> int:
    """The process the deepspeed launcher started for `rank` (the first below it whose
    environment says RANK=<rank>; its own workers inherit the variable)."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process of rank {rank} below pid {launcher}")


def session_processes(sid: int) -> List[int]:
    """Live processes of session `sid` (a launcher started with start_new_session is its leader;
    ranks and converters it started stay in it, also once orphaned)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            found.append(int(stat.parent.name))
    return found


class BackgroundLaunch:
    """`deepspeed --num_gpus N launch/<script> ARGS` in its own session, its output in `log`."""

    def __init__(self, script: str, args: List[str], ranks: int, log: Path):
        self.log = log
        self.ranks = ranks
        with open(log, "w") as sink:
            self.proc = subprocess.Popen(
                ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                 str(REPO / "launch" / script), *args],
                cwd=REPO, env=offline_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 300, poll_s: float = 0.02) -> None:
        """Poll until `ready()`; fails (with the log's end) if the run ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the run ended (exit {self.proc.returncode}) before {what}:\n" \
                                             + self.output()[-4000:]
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n" + self.output()[-4000:]
            time.sleep(poll_s)

    def rank(self, rank: int) -> int:
        return rank_process(self.proc.pid, rank)

    def signal_ranks(self, sig: int) -> None:
        """`sig` to every rank's process, as SLURM signals every task of a step."""
        for pid in [self.rank(r) for r in range(self.ranks)]:
            os.kill(pid, sig)

    def wait(self, timeout: float = 150) -> int:
        """The launcher's exit code; every process of the run is gone afterwards (killed if
        still there: a hung run must not outlive the test, and the failure says so)."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        for pid in session_processes(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait()
