"""Inside a study's job: `python -m trainer.slurm run-node PLAN GROUP` runs this array task's share of a group.

slurm/common.sh starts it in the batch step when a stage script gets `--pipeline-node PLAN GROUP` (the jobs
trainer/slurm/pipeline.py submits). It does for one node what the local runner does, through the same step
executor (trainer/pipeline/execute.py): compute the node's key from the finished markers of its inputs, skip it
when cached, clear or resume its directory, write its recipe, run its command (srun for the stages that run on
several ranks) and write the finished marker. The array tasks that share one node (label shards, preprocess
parts) take its lock for those cache decisions; the shards start the node, the finalize / merge job finishes
it. A stage stopped for pre-emption makes this exit 75, and the batch script requeues the job
(slurm/common.sh); the requeued task resumes the node from its checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.pipeline import cache
from trainer.pipeline.execute import Step, command_of, wait
from trainer.pipeline.graph import Node
from trainer.pipeline.report import write_report
from trainer.preemption import EXIT_RESUMABLE
from trainer.slurm.plan import FINISH_MODES, STAGE_MODES, Group, node_from

# the launcher of a node's multi-rank stages: one task per rank, every task ended when one fails
SRUN = ["srun", "--kill-on-bad-exit=1", "--unbuffered", sys.executable, "-m", "trainer.slurm.task"]


class JobExit(Exception):
    """The node's command stopped or failed: the job exits with `code` (its message is printed)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def node_lock(out_dir: Path) -> Iterator[None]:
    """Serialises the cache decisions of the array tasks that share one node (label shards, preprocess parts)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.slurm-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class SlurmRunner:
    """Runs a node's command in the job (trainer/pipeline/execute.py's Runner): prints it, passes SIGUSR1/SIGTERM
    that reach this process on to it (srun forwards them to every task) and turns "every rank stopped for
    pre-emption" ($WELLREAD_STOP_MARKER, trainer/slurm/task.py) into exit 75. The ranks' CPU time is not counted."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.cpu_seconds = 0.0

    def forward(self, signum, frame) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def run(self, node: Node, cmd: list[str]) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.forward)
        print(f"$ {shlex.join(cmd)}", flush=True)
        self.proc = subprocess.Popen(cmd)
        rc = wait(self.proc)
        marker = os.environ.get("WELLREAD_STOP_MARKER")
        if rc == 0 and marker and os.path.exists(marker):  # every rank stopped for pre-emption
            print(f"{node.id}: stopped for pre-emption; the requeued job resumes it", flush=True)
            raise JobExit(EXIT_RESUMABLE)
        if rc != 0:
            print(f"{node.id}: {node.kind} exited {rc}", file=sys.stderr, flush=True)
            raise JobExit(rc)


def upstream_digests(node: Node, record: dict[str, Any]) -> dict[str, str]:
    """Output digests of the node's inputs, from their finished markers (the jobs before this one wrote them)."""
    digests = {}
    for dep in node.deps:
        out = record["nodes"][dep]["out_dir"] if dep in record["nodes"] else record["deps_done"][dep]
        marker = cache.read_marker(Path(out) / cache.DONE)
        if marker is None:
            raise UserError(f"{node.id}: input stage {dep} is not finished ({Path(out) / cache.DONE} missing)")
        digests[dep] = marker["output_digest"]
    return digests


def job_command(node: Node, group: Group, task: int, record: dict[str, Any]) -> list[str] | None:
    """The command of this array task's share of the node (None for `select`, which runs in this process)."""
    if group.mode == "finalize":
        return [sys.executable, "-m", "trainer.cli", "label", str(node.recipe_path), "--finalize"]
    cmd = command_of(node, SRUN)
    if cmd is None:
        return None
    if group.mode == "shards":
        cmd += ["--shard-index", str(task), "--num-shards", str(group.tasks)]
    elif group.mode == "parts":
        cmd += ["--task-index", str(task), "--num-tasks", str(group.tasks)]
    elif group.mode == "merge":
        cmd += ["--merge", "--num-tasks", str(record["preprocess_tasks"])]
    return cmd


def report_main(out_dir: str) -> int:
    """The report group: results.md / results.json / results.png of the study (trainer/pipeline/report/)."""
    paths = write_report(Path(out_dir))
    print(paths.table)
    print(
        f"results: {paths.md}  {paths.json}\nplot: {paths.png}\nTensorBoard: tensorboard --logdir {out_dir}", flush=True
    )
    return 0


def run_node_main(argv: list[str]) -> int:
    """`python -m trainer.slurm run-node PLAN GROUP`: this array task's share of the group; -> exit code."""
    if len(argv) != 2:
        raise UserError("usage: python -m trainer.slurm run-node PLAN.json GROUP")
    record = json.loads(Path(argv[0]).read_text())
    os.chdir(record["cwd"])
    group = Group(**record["groups"][int(argv[1])])
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    if group.mode == "report":
        return report_main(record["out_dir"])
    node = node_from(record["nodes"][group.nodes[0] if group.mode != "run" else group.nodes[task]])
    digests = upstream_digests(node, record)
    command = job_command(node, group, task, record)
    with node_lock(node.out_dir):
        st = cache.status(node, digests)
        if st.cached:
            print(f"{node.id}: cached (finished earlier with the same inputs)", flush=True)
            return 0
        step = Step(node, st, command, SlurmRunner())
        if group.mode in STAGE_MODES:
            print(f"{node.id}: running {node.kind} ({st.reason})", flush=True)
            step.start()
    try:
        step.run()
    except JobExit as e:
        return e.code
    if group.mode in FINISH_MODES:
        with node_lock(node.out_dir):
            marker = step.finish()
        print(f"{node.id}: finished in {marker['seconds']:.0f}s", flush=True)
    return 0
