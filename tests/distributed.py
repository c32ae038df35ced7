"""Helpers to run real multi-process jobs (torchrun + gloo) from tests and read their outputs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wellread_cmd(nproc: int, *args: str) -> list[str]:
    if args and args[0].endswith(".py"):  # a tools/ script
        return [sys.executable, *args]
    if nproc == 1:
        return [sys.executable, "-m", "trainer.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "trainer.cli",
        *args,
    ]


def env_for(nproc: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONUNBUFFERED": "1",
    }


def run(nproc: int, *args: str, timeout: float = 600, expect: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        wellread_cmd(nproc, *args), cwd=ROOT, env=env_for(nproc), capture_output=True, text=True, timeout=timeout
    )
    if expect is not None and proc.returncode != expect:
        raise AssertionError(
            f"exit {proc.returncode} (expected {expect}) for {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def start(nproc: int, *args: str, log: Path) -> subprocess.Popen:
    """Start in its own process group so a kill takes every rank at once (like losing the node)."""
    f = open(log, "w")
    return subprocess.Popen(
        wellread_cmd(nproc, *args),
        cwd=ROOT,
        env=env_for(nproc),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    """Signal the launcher and every rank at once (torchrun puts workers in sessions of their own)."""
    import psutil

    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return proc.wait(timeout=120)


def wait_for(predicate, timeout: float = 300, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process ended ({proc.returncode}) before the condition held:\n"
                + (log.read_text()[-4000:] if log else "")
            )
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def metrics(out_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """Last value logged for each step (a resumed run re-logs the steps after its checkpoint)."""
    values: dict[int, float] = {}
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    return values


def max_step(out_dir: Path) -> int:
    return max(metrics(out_dir), default=0)
