"""Run a study's graph: in order, one stage process at a time, skipping what is finished.

Each stage's output goes to its directory's `pipeline.log`; the console gets one line when a stage starts
(or is found cached) and one when it ends, with the elapsed time and an ETA. SIGINT/SIGTERM/SIGUSR1 are
forwarded to the running stage as SIGTERM (it checkpoints and exits), then the pipeline stops; the same
command continues where it stopped; a pipeline killed outright (SIGKILL) takes its stage with it (the stage gets
SIGTERM from the kernel). One pipeline runs a study at a time, and every stage holds its directory's lock
(trainer/runlock.py), so a re-run never starts a twin of a stage that still runs. Each node runs through
trainer/pipeline/execute.py (the step executor the Slurm job shares), with `LocalRunner` running its command.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from trainer.errors import UserError
from trainer.fileio import atomic_write_bytes, atomic_write_json
from trainer.pipeline import cache
from trainer.pipeline.execute import command_of, dump_yaml_dict, execute, wait
from trainer.pipeline.graph import Graph, Node
from trainer.pipeline.report import fmt_time, write_report
from trainer.runlock import RunLock

LOG = "pipeline.log"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PLAN = "study.json"


class StageFailed(UserError):
    """A stage command exited non-zero (its log's tail has been printed)."""

    exit_code = 1


class Stopped(UserError):
    """The pipeline was asked to stop; the running stage was told to checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------- the plan
def plan(graph: Graph) -> list[tuple[Node, cache.Status | None, str]]:
    """(node, status or None when an upstream must run first, reason) for every node, without running any."""
    digests: dict[str, str] = {}
    out = []
    for node in graph:
        waiting = [d for d in node.deps if d not in digests]
        if waiting:
            out.append((node, None, f"after {', '.join(waiting[-2:])} run{'s' if len(waiting) == 1 else ''}"))
            continue
        st = cache.status(node, digests)
        if st.cached:
            digests[node.id] = st.marker["output_digest"]
        out.append((node, st, st.reason))
    return out


def print_plan(graph: Graph, rows: list, stream: TextIO) -> None:
    width = min(72, max(len(n.id) for n, _, _ in rows))
    for node, st, reason in rows:
        state = "cached" if st is not None and st.cached else "run"
        print(
            f"  {state:<6}  {node.id:<{width}}  {node.kind:<12}  {'' if state == 'cached' else reason}".rstrip(),
            file=stream,
        )
    to_run = sum(1 for _, st, _ in rows if st is None or not st.cached)
    print(f"{len(rows)} stages: {to_run} to run, {len(rows) - to_run} cached", file=stream)


# ---------------------------------------------------------------------------------------------- ETA
class Clock:
    """Elapsed time and an ETA from what is known: each remaining stage's own recorded time (it ran before), else
    the mean recorded time of stages of the same kind and student size (finished in this session or found cached
    in this study). Stages of a kind and size never timed are not guessed from other kinds (a fine-tune says
    nothing about a pre-training): the ETA then says how many are unknown, or gives none."""

    def __init__(self):
        self.t0 = time.time()
        self.done: list[tuple[str, str, float]] = []  # (kind, student, seconds) of finished stages

    def record(self, node: Node, seconds: float | None) -> None:
        if seconds is not None:
            self.done.append((node.kind, str(node.meta.get("student", "")), float(seconds)))

    def estimate(self, node: Node, previous: dict[str, Any] | None) -> float | None:
        if previous and previous.get("seconds") is not None:
            return float(previous["seconds"])
        student = str(node.meta.get("student", ""))
        times = [t for k, s, t in self.done if k == node.kind and s == student]
        return sum(times) / len(times) if times else None

    def eta(self, remaining: list[tuple[Node, dict[str, Any] | None]]) -> str:
        if not remaining:
            return "0s"
        guesses = [self.estimate(n, p) for n, p in remaining]
        known = [g for g in guesses if g is not None]
        unknown = len(guesses) - len(known)
        if not unknown:
            return f"~{fmt_time(sum(known))}"
        if not known:
            return f"unknown ({unknown} stage(s) of kinds not timed yet)"
        return f"more than ~{fmt_time(sum(known))} ({unknown} stage(s) of kinds not timed yet)"


# ---------------------------------------------------------------------------------------------- running
class LocalRunner:
    """Runs a stage's command (trainer/pipeline/execute.py's Runner) with its output in the node's pipeline.log;
    SIGINT/SIGTERM/SIGUSR1 that reach the pipeline are forwarded to the stage's process group as SIGTERM."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.signum: int | None = None
        self.cpu_seconds = 0.0  # user + system CPU time of the last stage and its processes

    def handler(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def run(self, node: Node, cmd: list[str]) -> None:
        log = node.out_dir / LOG
        rc = self.call(cmd, log)
        if self.signum is not None:
            raise Stopped(
                f"stopped by {signal.Signals(self.signum).name} during {node.id} (the stage was told to "
                f"checkpoint; log {log}); run the same command again to continue",
                self.signum,
            )
        if rc != 0:
            print(tail(log), file=sys.stderr)
            raise StageFailed(f"stage {node.id} failed (exit {rc}); command: {' '.join(cmd)}; log: {log}")

    def call(self, cmd: list[str], log: Path) -> int:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        with open(log, "ab") as f:
            f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )
        try:
            return wait(self.proc)
        finally:
            self.proc = None
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def die_with_parent(parent: int):
    """For `preexec_fn`: the stage gets SIGTERM (it checkpoints and exits) when the pipeline dies, however it dies:
    the stage runs in its own session (so a terminal's Ctrl-C reaches it only through our handler), and without
    this a SIGKILLed pipeline left it running with parent 1 while a re-run started a twin. Linux
    (prctl PR_SET_PDEATHSIG); the parent check closes the race with a parent that died before the prctl."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def write_plan_record(graph: Graph, recipe_path: str) -> None:
    graph.out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": recipe_path,
        **graph.plan,
        "nodes": [
            {"id": n.id, "kind": n.kind, "out_dir": str(n.out_dir), "deps": n.deps, "meta": n.meta} for n in graph
        ],
    }
    atomic_write_json(graph.out_dir / PLAN, record)
    atomic_write_bytes(graph.out_dir / "study.yaml", dump_yaml_dict(graph.plan["study"]).encode())


def run_locked(graph: Graph, recipe_path: str, rows: list, stream: TextIO) -> None:
    """Run every node not cached, in order, then write the report (the caller holds the study's lock)."""
    write_plan_record(graph, recipe_path)
    runner, clock = LocalRunner(), Clock()
    previous = {node.id: (st.marker if st is not None else None) for node, st, _ in rows}
    to_run = {node.id for node, st, _ in rows if st is None or not st.cached}
    handlers = {s: signal.signal(s, runner.handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        digests: dict[str, str] = {}
        nodes = list(graph)
        n = len(nodes)
        ran = cached = 0
        for i, node in enumerate(nodes, 1):
            if runner.signum is not None:
                raise Stopped(
                    f"stopped by {signal.Signals(runner.signum).name} before {node.id}; run the same "
                    "command again to continue",
                    runner.signum,
                )
            st = cache.status(node, digests)
            head = f"[{i:>{len(str(n))}}/{n}] {node.id}"
            if st.cached:
                digests[node.id] = st.marker["output_digest"]
                cached += 1
                clock.record(node, st.marker.get("seconds"))
                print(
                    f"{head}: cached ({node.kind}, took {fmt_time(st.marker.get('seconds'))} on "
                    f"{st.marker.get('finished', '?')})",
                    file=stream,
                    flush=True,
                )
                continue
            print(
                f"{head}: running {node.kind} ({st.reason}) | elapsed {fmt_time(time.time() - clock.t0)}",
                file=stream,
                flush=True,
            )
            marker = execute(node, st, command_of(node, graph.launcher), runner)
            digests[node.id] = marker["output_digest"]
            ran += 1
            clock.record(node, marker["seconds"])
            remaining = [(m, previous.get(m.id)) for m in nodes[i:] if m.id in to_run]
            print(
                f"{head}: done in {fmt_time(marker['seconds'])} | elapsed {fmt_time(time.time() - clock.t0)} "
                f"| ETA {clock.eta(remaining)} ({len(remaining)} stage(s) may still run)",
                file=stream,
                flush=True,
            )
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    print(
        f"all {n} stages finished: {ran} run, {cached} cached, in {fmt_time(time.time() - clock.t0)}",
        file=stream,
        flush=True,
    )
    paths = write_report(graph.out_dir)
    print(paths.table, file=stream)
    print(
        f"results: {paths.md}  {paths.json}\nplot: {paths.png}\nTensorBoard: tensorboard --logdir {graph.out_dir}",
        file=stream,
        flush=True,
    )


def run_graph(graph: Graph, recipe_path: str, dry_run: bool = False, stream: TextIO = sys.stdout) -> int:
    """Run (or, with dry_run, only plan) every node of `graph`; -> exit code."""
    rows = plan(graph)
    print(f"study {recipe_path} -> {graph.out_dir} ({len(rows)} stages)", file=stream, flush=True)
    if dry_run:
        print_plan(graph, rows, stream)
        return 0
    with RunLock(graph.out_dir):  # one pipeline per study: a second one stops here, naming the first
        run_locked(graph, recipe_path, rows, stream)
    return 0
