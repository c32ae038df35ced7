"""`wellread label` end to end: real teacher, kill + resume, job shards x ranks, automatic finalize."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_DATA
from distributed import kill_group, run, start, wait_for

from trainer.data.softlabels import SoftLabelStore
from trainer.data.transfer import TransferSection, split_into_sentences, transfer_examples


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small fine-tuned SST-2 classifier (a few steps: labeling only needs a real exported model)."""
    root = tmp_path_factory.mktemp("teacher")
    recipe = root / "ft.yaml"
    recipe.write_text(f"""
data: {{task: sst2, max_train_examples: 256, data_root: {FIXTURE_DATA}}}
model: {{name: bert-L2-H128}}
train: {{steps: 4, micro_batch: 32, global_batch: 32, lr: 1.0e-3}}
engine: {{ds_config: zero0}}
run: {{out_dir: {root / "run"}, tensorboard: false}}
""")
    run(1, "finetune", str(recipe))
    return root / "run" / "best"


def recipe_file(tmp_path: Path, teacher: Path, out: Path, **extra: str) -> Path:
    path = tmp_path / f"label-{out.name}.yaml"
    path.write_text(f"""
teacher: {teacher}
transfer: {{task: sst2, task_split: train, max_examples: {extra.get("n", 2400)}, data_root: {FIXTURE_DATA}}}
output: {{out_dir: {out}, kind: classification, part_examples: 150, batch_size: 16}}
""")
    return path


def test_sentence_splitting_and_html():
    text = 'A fine film.<br /><br />The cast is "superb!" Really? Yes. e.g. this stays.'
    t = TransferSection(split_sentences=True)
    assert split_into_sentences(text.replace("<br /><br />", " ")) == [
        "A fine film.",
        'The cast is "superb!"',
        "Really?",
        "Yes. e.g. this stays.",
    ]
    assert "<br" not in " ".join(e.text_a for e in _units(t, text))


def _units(t: TransferSection, text: str):
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.write(json.dumps({"text": text}) + "\n")
        t.files = [str(path)]
        return list(transfer_examples(t))


@pytest.mark.slow
def test_kill_during_labeling_then_resume_gives_the_same_store(tmp_path, teacher):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(1, "label", str(recipe_file(tmp_path, teacher, full)))
    args = ("label", str(recipe_file(tmp_path, teacher, killed)), "debug.step_sleep=1.0")
    proc = start(1, *args, log=tmp_path / "k.log")
    wait_for(lambda: len(list(killed.glob("part-*.json"))) >= 3, proc=proc, log=tmp_path / "k.log")
    kill_group(proc)
    assert not (killed / "manifest.json").exists()
    done = len(list(killed.glob("part-*.json")))
    proc = run(1, *args[:2])
    assert f"{done * 150:,} already done" in proc.stderr
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (full, killed))
    assert [s["files"] for s in a["shards"]] == [s["files"] for s in b["shards"]]
    assert a["order"] == b["order"]


@pytest.mark.slow
def test_job_shards_times_ranks_cover_every_example_once(tmp_path, teacher):
    single, split = tmp_path / "single", tmp_path / "split"
    run(1, "label", str(recipe_file(tmp_path, teacher, single, n="1001")))
    recipe = recipe_file(tmp_path, teacher, split, n="1001")
    first = run(2, "label", str(recipe), "--shard-index", "0", "--num-shards", "2")
    assert "other writers still running" in first.stderr and not (split / "manifest.json").exists()
    last = run(2, "label", str(recipe), "--shard-index", "1", "--num-shards", "2")
    assert "soft-label store complete (1,001 examples" in last.stderr
    a, b = SoftLabelStore(single), SoftLabelStore(split)
    assert len(a) == len(b) == 1001
    ids = np.arange(1001)
    ba, bb = a.batch(ids), b.batch(ids)
    assert (ba["example_ids"] == ids).all() and (bb["example_ids"] == ids).all()
    assert (ba["gold"] == bb["gold"]).all()
    # The teacher's fp32 logits differ between the runs by rounding only (batches padded to other lengths: other
    # matmul shapes), far below fp16's spacing (2**-11 relative), so the stored fp16 values are equal or, where
    # the fp32 value sits next to a rounding boundary, one fp16 step apart -- never more.
    la, lb = ba["logits"], bb["logits"]  # the stored fp16 values, widened to fp32 by the reader (exactly)
    assert (la.astype(np.float16) == la).all() and (lb.astype(np.float16) == lb).all()
    one_step = np.spacing(np.maximum(np.abs(la), np.abs(lb)).astype(np.float16))  # at the larger of the two
    assert (np.abs(la - lb) <= one_step).all(), np.abs(la - lb).max()
    writers = {p.name.split(".")[0].rsplit("-", 1)[0] for p in split.glob("part-*.json")}
    assert writers == {f"part-j000{j}of0002-r0{r}of02" for j in (0, 1) for r in (0, 1)}
    inspect = run(1, "tools/inspect_softlabels.py", str(split), "--no-progress")
    assert "1,001 examples" in inspect.stdout and "checksums ok" in inspect.stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_job_array_then_dependent_finalize(tmp_path, teacher):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "array"
    recipe = recipe_file(tmp_path, teacher, out, n="700")
    env = {**os.environ, "WELLREAD_PYTHON": sys.executable, "WELLREAD_REQUEUE": "0"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    sbatch = lambda *a: subprocess.run(
        ["sbatch", "--parsable", "--time=10", *a], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    array = sbatch("--array=0-2", "-o", str(tmp_path / "a-%A_%a.out"), "slurm/wellread.sbatch", "label", str(recipe))
    fin = sbatch(
        f"--dependency=afterok:{array}",
        "-o",
        str(tmp_path / "fin.out"),
        "slurm/wellread.sbatch",
        "label",
        str(recipe),
        "--finalize",
    )
    deadline = time.time() + 600
    while subprocess.run(["squeue", "-h", "-j", f"{array},{fin}"], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "Slurm jobs did not finish"
        time.sleep(1)
    state = subprocess.run(["scontrol", "show", "job", fin], capture_output=True, text=True).stdout
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.out")))
    assert "JobState=COMPLETED" in state, logs
    store = SoftLabelStore(out)
    assert len(store) == 700
    writers = {p.name.split(".")[0].rsplit("-", 1)[0] for p in out.glob("part-*.json")}
    assert writers == {f"part-j000{j}of0003-r00of01" for j in range(3)}
