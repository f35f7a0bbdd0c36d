"""One writer per output: a run (training or merge) holds an exclusive `flock` on a hidden
sibling of its output, `<parent>/.<name>.lock`, for as long as it writes there.

A sibling rather than `<output>/.lock`: the output directory itself is only created once
every check has passed, and a merge publishes its output by renaming a directory onto it.
The file holds the holder's pid and host, so the refusal names who holds it. The kernel
drops a flock when its process dies, however it dies (SIGKILL included): a lock file left by
a dead run is therefore stale by construction, and the next run takes it over and says so.
flock is per node on most network filesystems; across nodes only one process per run (rank
0, merge worker 0) takes the lock, and a second run is refused on whichever node it starts.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from core.errors import UserError


def lock_path(output: str | Path) -> Path:
    out = Path(output).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


class OutputLock:
    """`with OutputLock(out, "output_dir"):` ... ; UserError if another live process holds it."""

    def __init__(self, output: str | Path, key: str):
        self.output = Path(output).expanduser().absolute()
        self.path = lock_path(self.output)
        self.key = key
        self.fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(
                    f"{self.key}={self.output} is being written by another run ({holder}; lock {self.path}): "
                    f"wait for it to finish, or choose another {self.key}"
                ) from None
            # The holder before us may have unlinked the file between our open and our flock:
            # then we locked a dead inode; start over on the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            print(f"{self.key}={self.output}: taking over a stale lock ({previous}, no longer running)",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock, so nobody can lock this inode after us.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
