"""The merge's worker processes. `workers=W` forks W processes on this machine
(`run_local_workers`); under SLURM (SLURM_NTASKS > 1) or with `num_workers`/`worker_rank`, this
process is one of W independent workers that share only the filesystem, with no rendezvous
(`distributed_rank`): each owns whole shards, and worker 0 waits for the others' markers
(`wait_for_shards`) before it publishes.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Optional

from core.errors import UserError, disk_full_error
from merge.config import MergeOptions
from merge.native import kernels
from merge.stream import run_worker

if TYPE_CHECKING:
    from merge.run import Merge


def default_workers() -> int:
    """One worker per CPU this process may use, at most 4 (~70 MB RSS each)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def distributed_rank(options: MergeOptions) -> Optional[tuple]:
    """(rank, world) when this process is one of several independent workers, else None."""
    if options.num_workers is not None or options.worker_rank is not None:
        if options.num_workers is None or options.worker_rank is None:
            raise UserError("give both --num-workers W and --worker-rank R (0 <= R < W)")
        world, rank = options.num_workers, options.worker_rank
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        world, rank = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_PROCID"])
    else:
        return None
    if not 0 <= rank < world:
        raise UserError(f"worker rank {rank} is outside [0, {world}): give --worker-rank between 0 and W-1")
    return rank, world


def wait_for_shards(merge: Merge, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = [s.filename for s in merge.shards if not merge.is_complete(s)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise UserError(
                f"timed out after {timeout:.0f}s waiting for {len(missing)} shard(s) ({missing[0]}, ...) from the "
                "other workers: check their logs, then rerun the same command (complete shards are kept)"
            )
        time.sleep(1.0)


def _child(merge: Merge, rank: int, world: int, queue) -> None:
    try:
        import ctypes
        import signal

        # die with the parent: a killed merge must not leave workers writing behind it
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    try:
        run_worker(merge, rank, world, lambda n, b: queue.put(("progress", n, b)))
        queue.put(("done", rank, 0))
    except (UserError, OSError) as err:
        message = err if isinstance(err, UserError) else disk_full_error(err)
        if message is None:
            raise
        queue.put(("error", str(message), 0))
        queue.close()
        queue.join_thread()  # put() hands the message to a feeder thread: flush it before _exit
        os._exit(2)


def run_local_workers(merge: Merge, world: int, report: Callable[[int, int], None]) -> None:
    import multiprocessing as mp
    import queue as queue_lib

    kernels()  # built and loaded once, before the fork: the workers inherit them
    ctx = mp.get_context("fork")  # the plan and open readers are inherited, nothing re-parsed
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(merge, r, world, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    finished = 0
    try:
        while finished < world:
            try:
                kind, a, b = queue.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise UserError(
                        f"merge worker exited with code {dead[0].exitcode} (see the message above); "
                        "rerun the same command to resume"
                    )
                continue
            if kind == "progress":
                report(a, b)
            elif kind == "done":
                finished += 1
            else:
                raise UserError(a)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
