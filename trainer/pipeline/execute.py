"""Run one node of a study graph: the step executor of the local runner and of the Slurm job alike.

    Step(node, status, command, runner)
        .start()    clear its directory (or keep it to resume) and mark it started; write its recipe
        .run()      `select` in this process, or the node's command through `runner`
        .finish()   the finished marker (key, output digest, seconds, CPU seconds, command) -> the marker
    execute(...)    all three in one go

What differs between the two callers is how a command runs, the `runner`: the local one
(trainer/pipeline/runner.py) logs to the node's pipeline.log, forwards SIGINT/SIGTERM to the stage's process
group and counts its CPU seconds; the Slurm one (trainer/slurm/job.py) prints the command, passes
SIGUSR1/SIGTERM on to srun and turns a stop for pre-emption into a requeue. A runner raises when its command
was stopped or failed, so a step that returns from run() succeeded. The caller decides which phases a process
runs (a Slurm array of label shards starts a node in every task and finishes it in a later job) and what it
holds while it does (the Slurm job's node lock).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

import yaml

from trainer.fileio import atomic_write_bytes
from trainer.pipeline import cache
from trainer.pipeline.graph import Node, stage_command
from trainer.pipeline.select import run_select
from trainer.runlock import RunLock


class Runner(Protocol):
    """How a node's command runs; `cpu_seconds` is that of the last command (0 where it is not counted)."""

    cpu_seconds: float

    def run(self, node: Node, cmd: list[str]) -> None:
        """Run `cmd` to success, or raise (stopped, failed) with what the caller's exit code must be."""


def command_of(node: Node, launcher: Sequence[str] = ()) -> list[str] | None:
    """The node's command line; None for `select`, which runs in the calling process."""
    return None if node.kind == "select" else stage_command(node, launcher)


def dump_yaml_dict(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def wait(proc: subprocess.Popen) -> int:
    """The exit code of `proc`, through the signal handlers that run while we wait."""
    while True:
        try:
            return proc.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for old interpreters
            continue


class Step:
    """One node's run, in phases; `command` is None for `select` (see command_of)."""

    def __init__(self, node: Node, st: cache.Status, command: list[str] | None, runner: Runner):
        self.node, self.st, self.command, self.runner = node, st, command, runner
        self.t0: float | None = None

    def start(self) -> None:
        """Clear or resume the directory, never under a writer still alive (a stage of a killed pipeline that is
        checkpointing, a twin): its run lock (trainer/runlock.py) is taken for this, exclusive when clearing, after
        waiting up to $WELLREAD_LOCK_WAIT_S (default 120) seconds; the stage takes it again itself."""
        wait_s = float(os.environ.get("WELLREAD_LOCK_WAIT_S", "120"))
        say = functools.partial(print, file=sys.stderr, flush=True)
        with RunLock(self.node.out_dir, shared=self.st.resume, command=f"wellread pipeline: {self.node.id}").acquire(
            wait_s, on_wait=say
        ):
            cache.prepare(self.node, self.st)
            if self.node.recipe is not None:
                atomic_write_bytes(self.node.recipe_path, dump_yaml_dict(self.node.recipe).encode())

    def run(self) -> None:
        self.t0 = time.time()
        self.runner.cpu_seconds = 0.0
        if self.command is None:
            run_select(self.node)
        else:
            self.runner.run(self.node, self.command)

    def finish(self) -> dict[str, Any]:
        seconds = time.time() - self.t0 if self.t0 is not None else 0.0
        return cache.finish(self.node, self.st, seconds, self.command, self.runner.cpu_seconds)


def execute(node: Node, st: cache.Status, command: list[str] | None, runner: Runner) -> dict[str, Any]:
    """Run one node to completion and record it; -> its finished marker."""
    step = Step(node, st, command, runner)
    step.start()
    step.run()
    return step.finish()
