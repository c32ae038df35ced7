"""Resume with dropout on: every rank's RNG state must come back from the checkpoint.

The other resume tests (test_pretrain, test_distill, test_checkpoint_atomic) run with dropout 0, where the RNG
draws nothing during a step, so they would pass with the RNG state lost. Here dropout is 0.1 and an interrupted
run, resumed, must give the uninterrupted run's losses bit for bit (CPU fp32). One interruption per stage, each
also the test of one other path of the loop:
- pretrain (2 ranks): the time budget (`train.max_minutes`): the run stops early, exports, says so; resumed
  without a budget it continues to the uninterrupted losses;
- finetune: SIGKILL mid-run and resume; checkpoint pruning (`run.keep_checkpoints`) over the two runs;
- distill (online teacher): a run that stops on non-finite steps after its last checkpoint has logged steps
  the resumed run logs again; TensorBoard must show each step once per tag (the purge on resume).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA, tiny_corpus
from distributed import kill_group, max_step, metrics, run, start, wait_for
from inprocess import fit, one_process_fixture  # noqa: F401 (the one_process fixture)

DROPOUT = 0.1


def assert_bitwise(resumed: dict[int, float], reference: dict[int, float], steps) -> None:
    steps = list(steps)
    assert steps and all(s in resumed for s in steps), (steps, sorted(resumed))
    differ = [(s, resumed[s], reference[s]) for s in steps if resumed[s] != reference[s]]
    assert not differ, f"resumed losses differ from the uninterrupted run's (dropout {DROPOUT}): {differ}"


def checkpoint_tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def latest(out: Path) -> dict:
    return json.loads((out / "checkpoints" / "latest.json").read_text())


# ---------------------------------------------------------------------------------------------- pretrain
@pytest.fixture(scope="module")
def pretrain_recipe(tmp_path_factory) -> Path:

    root = tmp_path_factory.mktemp("pt-dropout")
    tiny_corpus(root / "corpus")
    path = root / "pretrain.yaml"
    path.write_text(f"""
data: {{train: {root / "corpus"}, eval: {root / "corpus"}, eval_max_sequences: 8, verify: size}}
model: {{name: bert-L2-H128, dropout: {DROPOUT}}}
train: {{steps: 4, micro_batch: 4, global_batch: 8, lr: 1.0e-3, warmup_steps: 1, seed: 3}}
engine: {{ds_config: zero2}}
run: {{log_every: 1, tensorboard: false}}
""")
    return path


@pytest.mark.slow
def test_pretrain_time_budget_stops_exports_and_resumes_to_the_uninterrupted_losses(tmp_path, pretrain_recipe):
    """2 ranks (two RNG streams). Budget 0.04 min = 2.4 s with a 3 s sleep after each step: the check before
    step 1 passes, the one before step 2 cannot."""
    reference, out = tmp_path / "reference", tmp_path / "budget"
    run(2, "pretrain", str(pretrain_recipe), f"run.out_dir={reference}")
    stopped = run(
        2, "pretrain", str(pretrain_recipe), f"run.out_dir={out}", "train.max_minutes=0.04", "debug.step_sleep=3"
    )
    assert "time budget of 0.04 min reached at step 1" in stopped.stderr
    assert sorted(metrics(out)) == [1] and latest(out)["step"] == 1
    export = json.loads((out / "export" / "wellread.json").read_text())
    assert export["step"] == 1 and export["stage"] == "pretrain"
    assert (out / "export" / "model.safetensors").is_file()
    assert 1 in metrics(out, "eval/loss"), "the stopped run evaluates like a finished one"

    resumed = run(2, "pretrain", str(pretrain_recipe), f"run.out_dir={out}")
    assert "resumed from" in resumed.stderr and "at step 1" in resumed.stderr
    ref = metrics(reference)
    assert sorted(ref) == [1, 2, 3, 4] and all(math.isfinite(v) for v in ref.values())
    assert_bitwise(metrics(out), ref, range(1, 5))
    assert json.loads((out / "export" / "wellread.json").read_text())["step"] == 4


# ---------------------------------------------------------------------------------------------- finetune
@pytest.fixture
def subprocess_threads():
    """This process computes with the thread count of a 1-rank subprocess (tests/distributed.py), so a checkpoint
    written by a killed subprocess continues here with the same arithmetic."""
    import torch
    from distributed import env_for

    before = torch.get_num_threads()
    torch.set_num_threads(int(env_for(1)["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_finetune_sigkill_and_resume_match_and_old_checkpoints_are_pruned(
    tmp_path, capsys, one_process, subprocess_threads
):
    """The uninterrupted and the resumed run in this process; the killed one a real process, SIGKILLed."""
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"""
data: {{task: sst2, max_train_examples: 128, max_seq_len: 64, eval_split: dev, data_root: {FIXTURE_DATA}}}
model: {{name: bert-L2-H128, dropout: {DROPOUT}}}
train: {{steps: 6, micro_batch: 8, global_batch: 16, lr: 1.0e-3, warmup_steps: 1, seed: 5}}
engine: {{ds_config: zero2}}
run: {{log_every: 1, ckpt_every: 2, keep_checkpoints: 2, tensorboard: false}}
""")
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert fit(one_process, "finetune", recipe, f"run.out_dir={reference}") == 0
    log = tmp_path / "killed.log"
    proc = start(1, "finetune", str(recipe), f"run.out_dir={out}", "debug.step_sleep=1.0", log=log)
    wait_for(lambda: max_step(out) >= 3 and (out / "checkpoints" / "latest.json").is_file(), proc=proc, log=log)
    kill_group(proc)
    saved = latest(out)["step"]
    assert saved in (2, 4) and saved < 6, saved
    capsys.readouterr()
    assert fit(one_process, "finetune", recipe, f"run.out_dir={out}") == 0
    assert f"at step {saved}" in capsys.readouterr().err
    assert_bitwise(metrics(out), metrics(reference), range(saved + 1, 7))
    assert metrics(out, "eval_dev/accuracy")[6] == metrics(reference, "eval_dev/accuracy")[6]
    # keep_checkpoints: 2 -> of the saves at steps 2, 4, 6 only the newest two stay, and latest.json names one
    for run_dir in (reference, out):
        assert checkpoint_tags(run_dir) == ["step-0000004", "step-0000006"], run_dir
        pointer = latest(run_dir)
        assert pointer == {"tag": "step-0000006", "step": 6, "world_size": 1}
        step_dir = run_dir / "checkpoints" / pointer["tag"]
        assert (step_dir / "rank-00000.json").is_file() and any(step_dir.rglob("*model_states.pt"))
    assert not list((out / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- distill
@pytest.mark.slow
def test_distill_resume_after_a_stop_matches_and_tensorboard_shows_each_step_once(tmp_path, capsys, one_process):
    """Online teacher, no store. Steps 3 and 4 are made non-finite and the run stops there (after its step-2
    checkpoint, with steps 3-4 logged and flushed: the logger is closed on every exit path); the re-run resumes
    at step 2. A SIGKILL would lose TensorBoard's unflushed events and so not exercise the purge every time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_distill import random_classifier

    from trainer.errors import TrainingStopped

    teacher = random_classifier(tmp_path / "teacher", 1)
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(f"""
data: {{transfer: {{task: sst2, task_split: train, max_examples: 64, data_root: {FIXTURE_DATA}}}, verify: size}}
teacher: {{model: {teacher}}}
model: {{name: bert-L2-H128, dropout: {DROPOUT}}}
train: {{epochs: null, steps: 6, micro_batch: 8, global_batch: 16, lr: 2.0e-3, warmup_steps: 1, seed: 7}}
engine: {{ds_config: zero0}}
run: {{log_every: 1, ckpt_every: 2}}
""")
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    assert fit(one_process, "distill", recipe, f"run.out_dir={reference}", "run.tensorboard=false") == 0
    with pytest.raises(TrainingStopped, match=r"2 non-finite steps in a row \(last at step 4\)"):
        fit(
            one_process,
            "distill",
            recipe,
            f"run.out_dir={out}",
            "debug.nan_at_steps=[3,4]",
            "train.max_nonfinite_in_a_row=2",
        )
    assert latest(out)["step"] == 2

    def scalars() -> EventAccumulator:
        acc = EventAccumulator(str(out / "tb"))
        acc.Reload()
        return acc

    before = [e.step for e in scalars().Scalars("train/loss")]
    assert before == [1, 2, 3, 4], "the stopped run's steps 3-4 are in TensorBoard (else nothing to purge)"
    capsys.readouterr()
    assert fit(one_process, "distill", recipe, f"run.out_dir={out}") == 0
    assert "at step 2" in capsys.readouterr().err
    # 64 examples, 4 global batches per epoch: steps 5-6 are the second epoch (the cursor crosses an epoch)
    assert_bitwise(metrics(out), metrics(reference), range(3, 7))
    acc = scalars()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("train/")]
    assert "train/loss" in tags and "train/kd" in tags
    for tag in tags:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    losses, logged = metrics(out), {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == list(range(1, 7))
    assert all(math.isfinite(logged[s]) and logged[s] == pytest.approx(losses[s], rel=1e-6) for s in logged)


@pytest.mark.slow
def test_a_student_started_from_a_checkpoint_trains_with_its_dropout(tmp_path, one_process):
    """Hugging Face's from_pretrained returns a model in eval mode: PF / PD students and teachers fine-tuned from
    a checkpoint trained without dropout until their first evaluation, so `model.dropout` changed nothing. The
    first step's loss (before any update) differs between dropout 0 and 0.3 only if dropout is on."""
    from test_distill import random_classifier

    teacher = random_classifier(tmp_path / "teacher", 1)
    init = random_classifier(tmp_path / "init", 2)  # a saved checkpoint as the student's start (PD's case)
    recipe = tmp_path / "pd.yaml"
    recipe.write_text(f"""
data: {{transfer: {{task: sst2, task_split: train, max_examples: 32, data_root: {FIXTURE_DATA}}}, verify: size}}
teacher: {{model: {teacher}}}
model: {{name: {init}}}
train: {{epochs: null, steps: 1, micro_batch: 16, global_batch: 16, lr: 1.0e-3, warmup_steps: 0, seed: 3}}
engine: {{ds_config: zero0}}
run: {{log_every: 1, tensorboard: false}}
""")
    first = {}
    for p in (0.0, 0.3):
        out = tmp_path / f"dropout-{p}"
        assert fit(one_process, "distill", recipe, f"run.out_dir={out}", f"model.dropout={p}") == 0
        first[p] = metrics(out)[1]
    assert first[0.0] != first[0.3], first
