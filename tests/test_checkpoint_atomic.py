"""At every instant of a save or an export there is a valid latest checkpoint and a valid export.

The process is killed (os._exit, as SIGKILL or a power cut would) at each point of the publish sequence
(trainer/checkpoint.py `_crash_point`); what is on disk must then load, and a re-run must finish with the
same losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import tiny_corpus
from distributed import metrics, run

SAVE_POINTS = ["before_publish", "before_latest", "before_prune"]
EXPORT_POINTS = ["export_before_link", "export_before_cleanup"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:

    root = tmp_path_factory.mktemp("atomic")
    tiny_corpus(root / "corpus")
    path = root / "r.yaml"
    path.write_text(f"""
data: {{train: {root / "corpus"}, verify: size}}
model: {{name: bert-L2-H128, dropout: 0.0}}
train: {{steps: 6, micro_batch: 8, global_batch: 8, lr: 1.0e-3, warmup_steps: 1, seed: 3}}
engine: {{ds_config: zero0}}
run: {{log_every: 1, ckpt_every: 2, keep_checkpoints: 1, tensorboard: false}}
""")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, recipe) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    run(1, "pretrain", str(recipe), f"run.out_dir={out}")
    return out


def assert_valid_checkpoint(out: Path) -> int:
    root = out / "checkpoints"
    pointer = json.loads((root / "latest.json").read_text())
    step_dir = root / pointer["tag"]
    assert (step_dir / "rank-00000.json").is_file() and (step_dir / "config.json").is_file(), pointer
    assert any(step_dir.rglob("*model_states.pt")), pointer
    return pointer["step"]


def assert_valid_export(out: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    export = out / "export"
    assert export.is_dir(), "export missing"
    AutoConfig.from_pretrained(export)
    assert len(load_file(export / "model.safetensors")) > 10


def _crash(tmp_path: Path, recipe: Path, out: Path, point: str, *overrides: str) -> None:
    os.environ["WELLREAD_CRASH_AT"] = point
    try:
        run(1, "pretrain", str(recipe), f"run.out_dir={out}", *overrides, expect=137)
    finally:
        del os.environ["WELLREAD_CRASH_AT"]


@pytest.mark.slow
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_kill_inside_a_save_leaves_a_loadable_latest_and_resume_matches(tmp_path, recipe, uninterrupted, point):
    out = tmp_path / "run"
    _crash(tmp_path, recipe, out, f"{point}@2")  # during the second save (step 4), after a published step 2
    assert assert_valid_checkpoint(out) in (2, 4)
    run(1, "pretrain", str(recipe), f"run.out_dir={out}")
    assert metrics(out) == metrics(uninterrupted)
    assert_valid_checkpoint(out)
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("point", EXPORT_POINTS)
def test_kill_inside_an_export_keeps_the_previous_export(tmp_path, recipe, uninterrupted, point):
    """A finished run continued for two more steps: the new export is killed half-way; the old one stays."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out, symlinks=True)
    before = (out / "export").resolve()
    _crash(tmp_path, recipe, out, point, "train.steps=8")
    assert_valid_export(out)
    assert (out / "export").resolve() in (before, *out.glob(".export.v*"))
    run(1, "pretrain", str(recipe), f"run.out_dir={out}", "train.steps=8")
    assert_valid_export(out)
    assert json.loads((out / "export" / "wellread.json").read_text())["step"] == 8
    assert len(list(out.glob(".export.v*"))) == 1  # the old version and any leftover are cleaned up
