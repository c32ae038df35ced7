"""SIGTERM / SIGUSR1 ask for a checkpoint and a clean exit at the next step boundary.

Slurm sends SIGTERM on pre-emption or `scancel`, and SIGUSR1 ahead of the time limit with
`#SBATCH --signal=B:USR1@120`. The handler only sets a flag: the training loop agrees on it across
ranks (one all-reduce per step), saves, and exits with EXIT_RESUMABLE so job scripts can requeue.
"""

from __future__ import annotations

import signal

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped early on request, resume from the checkpoint

_requested: list[int] = []


def _handler(signum, frame) -> None:
    _requested.append(signum)


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def requested() -> bool:
    return bool(_requested)


def reason() -> str:
    return signal.Signals(_requested[0]).name if _requested else ""
