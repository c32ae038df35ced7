"""One writer per run directory: an advisory `flock` beside the directory, held for the writer's whole life.

    RunLock(out_dir)                         exclusive: a training stage, an unsharded label or preprocess run
    RunLock(out_dir, shared=True)            one of several cooperating writers (a label shard, a corpus part);
    RunLock(out_dir, part="shard-3-of-8")      ... each also holds its own part exclusively
    .acquire(wait_s=0)  -> self, or RunDirBusy naming the holder (pid, host, command, since)
    .release()

Why `flock` on a file *beside* the directory (`runs/.pretrain_tiny.lock` for `runs/pretrain_tiny`): the kernel
drops the lock when the holding process dies however it dies (SIGKILL, OOM, node loss), so there is never a
stale lock to clean up, and clearing the directory (the pipeline does before a re-run) cannot unlink the lock
from under its holder (a new file would be a second, unrelated lock). The file itself is never removed, for the
same reason; its text says who holds it. On NFS (v4) Linux maps `flock` to byte-range locks that every client
sees; Lustre needs the `flock` mount option.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from trainer.errors import UserError


class RunDirBusy(UserError):
    """Another live process writes this run directory (exit 3: not a mistake in the command itself)."""

    exit_code = 3


def lock_path(out_dir: Path, part: str | None = None) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{'.' + part if part else ''}.lock"


def holder(path: Path) -> dict[str, Any]:
    """What the lock file says about its holder ({} while a new holder has not written it yet)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, since {since})"


class RunLock:
    """An exclusive (or, with `shared`, a shared) advisory lock on `out_dir`, plus one on `part` if given."""

    def __init__(self, out_dir: Path, part: str | None = None, shared: bool = False, command: str | None = None):
        self.out_dir = Path(out_dir)
        self.shared = shared or part is not None
        self.paths = [lock_path(self.out_dir)] + ([lock_path(self.out_dir, part)] if part else [])
        self.command = command or " ".join(["wellread", *sys.argv[1:]])[:300]
        self.fds: list[int] = []

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5, on_wait=None) -> RunLock:
        """Take every lock, waiting up to `wait_s` (calling `on_wait(message)` once); else raise RunDirBusy."""
        deadline, told = time.monotonic() + wait_s, False
        while True:
            busy = self._try()
            if busy is None:
                return self
            if time.monotonic() >= deadline:
                raise RunDirBusy(
                    f"{self.out_dir}: already being written by {describe(holder(busy))}; two writers would corrupt "
                    f"it: wait for that process to end or stop it (lock {busy})"
                )
            if on_wait is not None and not told:
                on_wait(f"{self.out_dir}: in use by {describe(holder(busy))}; waiting up to {wait_s:.0f}s for it")
                told = True
            time.sleep(poll_s)

    def _try(self) -> Path | None:
        """Take the locks in order; on a conflict release what was taken and return the busy lock's path."""
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(self.paths):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            mode = fcntl.LOCK_SH if (self.shared and i == 0) else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.release()
                return path
            self.fds.append(fd)
            # who holds it, for the next one's message (shared holders overwrite each other: the text names one)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        return None

    def release(self) -> None:
        for fd in reversed(self.fds):
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the last descriptor of the open file drops its flock
        self.fds = []

    def __enter__(self) -> RunLock:
        """`with RunLock(d):` takes it now; `with RunLock(d).acquire(wait_s):` keeps what acquire took."""
        return self if self.fds else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
