"""How a run ends when it does not finish: errors a user can cause (printed as one line, exit 2)
and the preempted exit code (a checkpoint was saved; requeue and resume)."""

import errno
import re
from typing import Optional


# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": a training rank
# exits with it after a preemption checkpoint, and the batch script requeues the job on it.
PREEMPTED_EXIT_CODE = 75


class UserError(Exception):
    """A problem with the user's input: the message names the field or file and the fix."""

    exit_code = 2


# errno values and library wordings of "the disk (or the file size limit) is full": savers
# wrap the OSError (safetensors: "IoError(Os { code: 28, kind: StorageFull ..", torch.save:
# "file write failed", or, when the disk fills while its zip writer closes the file (DeepSpeed's
# checkpoint partitions), the short write it finds: "unexpected pos 6851392 vs 6851280"), so
# the chain's text is matched as well.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_WORDS = re.compile(r"No space left on device|Disk quota exceeded|File too large|StorageFull|FileTooLarge|"
                         r"(?:code: |os error )(?:28|27|122)\b|file write failed|unexpected pos \d+ vs \d+")


def _chain(err: BaseException) -> list:
    """The error and those it was raised from or during, innermost last."""
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def disk_full_error(err: BaseException) -> Optional[UserError]:
    """A UserError for a write that ran out of disk space (or quota, or RLIMIT_FSIZE), naming
    the file when the error does; None for any other error."""
    chain = _chain(err)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS or _DISK_WORDS.search(str(e)):
            where = getattr(e, "filename", None) or next((c.filename for c in chain if getattr(c, "filename", None)), None)
            return UserError(
                f"out of disk space{f' writing {where}' if where else ''} ({str(e).splitlines()[0][:120]}): "
                "free space or raise the quota, then rerun the same command (finished outputs and complete "
                "checkpoints are kept; see docs/failure-modes.md)"
            )
    return None


# How gloo ("Timed out waiting 2000ms for recv operation to complete") and NCCL (its watchdog's
# "Watchdog caught collective operation timeout: WorkNCCL(..., Timeout(ms)=1800000)", raised in
# Python under TORCH_NCCL_BLOCKING_WAIT) say that a rank waited longer than the process group's
# timeout for the others.
_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms|Timeout\(ms\)=(\d+)")


def collective_timeout_error(err: BaseException) -> Optional[UserError]:
    """A UserError naming training.ddp_timeout for a barrier or collective that timed out; None
    for any other error."""
    for e in _chain(err):
        m = _TIMED_OUT.search(str(e))
        if m:
            seconds = int(m.group(1) or m.group(2)) / 1000
            return UserError(
                f"this rank waited {seconds:g} s for the other ranks at a barrier or collective and gave up "
                f"(training.ddp_timeout={seconds:g}): another rank was still busy, e.g. preparing the data alone or "
                "writing the final model; raise training.ddp_timeout=<seconds>, or give data preparation more "
                "cores (data.num_proc); a rerun resumes from the newest checkpoint"
            )
    return None


# How gloo and NCCL tell the ranks waiting in a collective that another rank has exited.
_PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|remote process exited|"
                        r"NCCL communicator was aborted")


def another_rank_ended(err: BaseException) -> bool:
    return any(_PEER_GONE.search(str(e)) for e in _chain(err))


def exit_on_user_error(main, *args, **kwargs):
    """Run `main`; a UserError (or a full disk, or a rank that timed out waiting for the others)
    becomes one line on stderr and exit code 2, no traceback."""
    import os
    import sys

    try:
        try:
            return main(*args, **kwargs)
        except UserError:
            raise
        except Exception as err:  # savers wrap ENOSPC in their own types (SafetensorError, RuntimeError)
            disk = disk_full_error(err)
            if disk is not None:
                raise disk from err
            timeout = collective_timeout_error(err)
            if timeout is not None:
                raise timeout from err
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and another_rank_ended(err):
                # The rank that ended has said why (its error line or traceback); this one was
                # waiting for it in a collective (a full disk on rank 0 during a save): no traceback.
                print(f"\nrank {os.environ.get('RANK', '?')} stopped: another rank ended first", file=sys.stderr, flush=True)
                sys.exit(1)
            raise
    except UserError as err:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        if rank != "0":
            # Under a multi-rank launcher every rank usually fails the same way; one line is
            # enough, and rank 0 prints it. The launcher ends all ranks once any exits non-zero
            # (deepspeed polls every second), so another rank that failed first would kill rank 0
            # before its line: wait for that, killable. A failure of this rank alone is printed.
            import signal
            import time

            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(RANK_ERROR_GRACE_S)
        # Another rank's progress bar may hold the terminal line (it ends in \r, not \n):
        # start a line of our own.
        start = "\n" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        where = "" if rank == "0" else f"(rank {rank}) "
        print(f"{start}error: {where}{err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


RANK_ERROR_GRACE_S = 5.0
"""How long a non-zero rank waits, on a user error, for rank 0 to report the same error."""


def argument_parser(usage: str, **kwargs):
    """An argparse parser whose mistakes (unknown flag, missing argument) are UserErrors: one
    line that ends with `usage`, instead of argparse's own multi-line usage and exit."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(f"{message}: usage: {usage}")

    # The description is the launcher's docstring: its command lines keep their layout.
    return Parser(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
