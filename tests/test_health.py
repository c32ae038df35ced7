"""Degenerate runs are flagged (trainer/health.py): by the rules themselves, and end to end by a study whose
basic run can only learn one class (its training labels are all "positive"): the run's wellread.json, its
TensorBoard text, its last line and the study's report all say so."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURE_DATA

from trainer.health import RunHealth, prediction_collapse, prediction_spread


def test_one_class_for_every_dev_example_is_collapse_and_the_bar_rises_with_a_skewed_dev_set():
    balanced = np.array([0, 1] * 50)
    assert prediction_collapse(prediction_spread(np.ones(100), balanced, False)) is not None
    assert prediction_collapse(prediction_spread(np.r_[np.ones(96), np.zeros(4)], balanced, False)) is not None
    assert prediction_collapse(prediction_spread(np.r_[np.ones(90), np.zeros(10)], balanced, False)) is None
    skewed = np.r_[np.ones(96), np.zeros(4)]  # a 96%-majority dev set: matching it is not collapse, all-1 is
    assert prediction_collapse(prediction_spread(skewed, skewed, False)) is None
    assert prediction_collapse(prediction_spread(np.ones(100), skewed, False)) is not None
    logits = np.stack([np.zeros(100), np.linspace(-1, 1, 100)], axis=1)  # [N, C] logits: argmax taken
    assert prediction_collapse(prediction_spread(logits, balanced, False)) is None
    y = np.linspace(0, 5, 100)
    assert prediction_collapse(prediction_spread(np.full(100, 2.5) + 0.01 * y, y, True)) is not None
    assert prediction_collapse(prediction_spread(y + 0.3, y, True)) is None


def feed(health: RunHealth, losses: list[float], agree: float, teacher_classes: tuple[float, float]) -> None:
    for i, loss in enumerate(losses, 1):
        sums = {"agree": agree, "teacher_class/0": teacher_classes[0], "teacher_class/1": teacher_classes[1]}
        health.step(i, loss, sums, count=sum(teacher_classes))


def test_stuck_agreement_and_a_flat_loss_are_flagged_and_survive_a_resume():
    state: dict = {}
    # the teacher answers class 0 for 70% of the examples; the student agrees with it 70% of the time
    feed(RunHealth(state, log_every=2), [1.0, 1.0, 0.999, 0.998], agree=7, teacher_classes=(7, 3))
    resumed = RunHealth(json.loads(json.dumps(state)), log_every=2)  # the checkpoint's JSON round trip
    flags = resumed.flags()
    assert set(flags) == {"agreement_stuck", "loss_flat"}, flags
    assert "70.0%" in flags["agreement_stuck"]
    good: dict = {}
    feed(RunHealth(good, log_every=2), [1.0, 0.9, 0.6, 0.5], agree=9, teacher_classes=(7, 3))
    assert RunHealth(good, 2).flags() == {}
    one_window: dict = {}
    feed(RunHealth(one_window, log_every=10), [1.0, 1.0], agree=9, teacher_classes=(7, 3))
    assert "loss_flat" not in RunHealth(one_window, 10).flags()  # one window: nothing to compare yet


def one_class_data(root) -> None:
    """The fixture data with SST-2's training labels all 1 (a run that can only learn one class)."""
    shutil.copytree(FIXTURE_DATA, root)
    path = root / "glue" / "SST-2" / "train.tsv.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.rsplit("\t", 1)[1] == "1"]
    path.write_bytes(gzip.compress(("\n".join(kept) + "\n").encode()))


@pytest.mark.slow
def test_a_collapsed_run_is_flagged_in_its_record_tensorboard_last_line_and_the_report(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_pipeline import pipeline, run_id, study_yaml

    one_class_data(tmp_path / "data")
    out = tmp_path / "study"
    recipe = study_yaml(
        tmp_path / "s.yaml",
        out,
        ["basic"],
        [1],
        study__data_root=str(tmp_path / "data"),
        finetune__train__epochs=3,
        finetune__train__lr=3e-3,
        finetune__run__tensorboard=True,
    )
    proc = pipeline(str(recipe))
    run = out / run_id("basic", 1)
    record = json.loads((run / "export" / "wellread.json").read_text())
    assert "collapsed" in record["health"], record
    log = (run / "pipeline.log").read_text().rstrip().splitlines()
    assert log[-1].startswith("DEGENERATE RUN (") and "collapsed" in log[-1], log[-3:]
    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0}).Reload()
    texts = [
        e.tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
        if "health" in tag
        for e in events.Tensors(tag)
    ]
    assert texts and "collapsed" in texts[-1], events.Tags()
    results = json.loads((out / "results.json").read_text())
    assert "collapsed" in results["rows"][0]["seeds"]["1"]["flags"]
    table = next(line for line in proc.stdout.splitlines() if line.startswith("| bert-L2-H128 |"))
    assert "DEGENERATE" in table and "collapsed (seed 1)" in table, table
    assert "## Degenerate runs" in (out / "results.md").read_text()
