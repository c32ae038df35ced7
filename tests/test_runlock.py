"""One writer per run directory (trainer/runlock.py): the lock is real across processes, dies with its holder,
and every writer takes it before doing anything (a stage, a label shard, a pipeline and its steps)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from trainer.runlock import RunDirBusy, RunLock, lock_path

HOLD = """
import sys, time
from trainer.runlock import RunLock
RunLock(sys.argv[1], part=sys.argv[2] or None, command="holder-under-test").acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(out: Path, part: str = "") -> subprocess.Popen:
    """A live process holding `out`'s lock (with `part`: shared, plus the part exclusively)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), part], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    out = tmp_path / "run"
    holder = hold_in_child(out)
    try:
        with pytest.raises(RunDirBusy) as e:
            RunLock(out).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "holder-under-test" in msg, msg
        assert "\n" not in msg and str(out) in msg
        with pytest.raises(RunDirBusy):
            RunLock(out, shared=True).acquire()  # a reader of a run being written is refused too
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(out):  # SIGKILL left no stale lock: the kernel dropped it with the process
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_parts_share_the_directory_but_not_a_part_and_exclude_a_whole_run_writer(tmp_path):
    out = tmp_path / "store"
    shard0 = hold_in_child(out, "shard-0-of-2")
    try:
        with RunLock(out, part="shard-1-of-2"):  # a sibling shard writes beside it
            pass
        with pytest.raises(RunDirBusy, match="shard-0-of-2"):
            RunLock(out, part="shard-0-of-2").acquire()  # a twin of the same shard
        with pytest.raises(RunDirBusy):
            RunLock(out).acquire()  # finalize / clear while a shard still writes
    finally:
        shard0.kill()
        shard0.wait()
    with RunLock(out):
        pass


def test_waiting_takes_the_lock_when_the_holder_ends(tmp_path):
    out = tmp_path / "run"
    holder = hold_in_child(out)
    said = []
    subprocess.Popen(["sh", "-c", f"sleep 1.5; kill {holder.pid}"])
    with RunLock(out).acquire(wait_s=60, poll_s=0.1, on_wait=said.append):
        assert holder.poll() is not None
    holder.wait()
    assert len(said) == 1 and f"pid {holder.pid}" in said[0]


def test_a_second_pretrain_on_a_locked_run_directory_exits_at_once_with_one_line(tmp_path):
    out = tmp_path / "pretrain"
    holder = hold_in_child(out)
    try:
        t = time.monotonic()
        proc = run_cli(
            "pretrain",
            "recipes/demo_pretrain.yaml",
            f"run.out_dir={out}",
            f"data.train={tmp_path / 'no-corpus'}",  # never read: the lock is taken before anything is built
            timeout=120,
        )
        seconds = time.monotonic() - t
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == RunDirBusy.exit_code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("wellread: error:")]
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()  # nothing written
    print(f"refused after {seconds:.1f}s (process start included)")


def test_the_pipeline_refuses_a_second_pipeline_and_waits_then_stops_for_a_live_stage(tmp_path):
    from test_pipeline import run_id, study_yaml

    out = tmp_path / "study"
    recipe = study_yaml(tmp_path / "s.yaml", out, ["basic"], [1])
    holder = hold_in_child(out)  # another pipeline on this study
    try:
        proc = run_cli("pipeline", str(recipe), timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == RunDirBusy.exit_code and f"pid {holder.pid}" in proc.stderr, proc.stderr[-3000:]
    # a stage directory still written by a live process: the re-run says so, waits, then stops (never a twin)
    stage_dir = out / run_id("basic", 1)
    holder = hold_in_child(stage_dir)
    try:
        proc = run_cli("pipeline", str(recipe), env={"WELLREAD_LOCK_WAIT_S": "2"}, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == RunDirBusy.exit_code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "waiting up to 2s" in proc.stderr and f"pid {holder.pid}" in proc.stderr, proc.stderr[-3000:]
    assert not (stage_dir / "export").exists()


@pytest.mark.parametrize("resume", [False, True], ids=["clear", "resume"])
def test_the_step_executor_of_both_runners_never_clears_or_resumes_under_a_live_writer(tmp_path, monkeypatch, resume):
    """The local pipeline and the Slurm in-job runner (a requeued job whose previous instance still runs on
    another node) start every node through execute.Step.start: a live holder of the node's lock stops it."""
    from trainer.pipeline.cache import STARTED, Status
    from trainer.pipeline.execute import Step
    from trainer.pipeline.graph import Node

    node = Node(id="runs/x", kind="finetune", out_dir=tmp_path / "runs" / "x")
    node.out_dir.mkdir(parents=True)
    (node.out_dir / STARTED).write_text("{}")
    (node.out_dir / "checkpoint-of-the-live-run").write_text("precious")
    monkeypatch.setenv("WELLREAD_LOCK_WAIT_S", "0")
    holder = hold_in_child(node.out_dir)
    try:
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            Step(node, Status(cached=False, reason="new", key="k", resume=resume), ["true"], runner=None).start()
    finally:
        holder.kill()
        holder.wait()
    assert (node.out_dir / "checkpoint-of-the-live-run").read_text() == "precious"
    Step(node, Status(cached=False, reason="new", key="k", resume=resume), ["true"], runner=None).start()
    assert (node.out_dir / "checkpoint-of-the-live-run").exists() == resume  # cleared only when not resuming
