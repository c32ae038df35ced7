"""Fine-tuning and evaluation: bucketing, rank equivalence, exactly-once evaluation, initialisation sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DATA
from distributed import metrics, run

from trainer.data.sampling import BucketedOrder, Cursor

STEPS = 8


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft") / "finetune.yaml"
    path.write_text(f"""
data: {{task: sst2, max_train_examples: 512, eval_split: dev, data_root: {FIXTURE_DATA}}}
model: {{name: bert-L2-H128, dropout: 0.0}}
train: {{steps: {STEPS}, micro_batch: 8, global_batch: 16, lr: 1.0e-3, warmup_steps: 1, seed: 3}}
engine: {{ds_config: zero2}}
run: {{log_every: 4, eval_every: 4}}
""")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, recipe) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ftruns")
    out = {"1rank": root / "one", "2rank": root / "two"}
    run(1, "finetune", str(recipe), f"run.out_dir={out['1rank']}")
    run(2, "finetune", str(recipe), f"run.out_dir={out['2rank']}")
    return out


def test_bucketed_batches_cover_each_example_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000)
    order = BucketedOrder(lengths, 32, 0, 1, seed=1, window=10)
    seen = np.concatenate([order.global_items(Cursor(0, b)) for b in range(order.batches_per_epoch)])
    assert len(seen) == len(set(seen.tolist())) == 31 * 32
    padded = sum(32 * lengths[order.global_items(Cursor(0, b))].max() for b in range(order.batches_per_epoch))
    random_order = rng.permutation(1000)[:992].reshape(31, 32)
    padded_random = sum(32 * lengths[b].max() for b in random_order)
    real = lengths[seen].sum()
    assert padded - real < 0.25 * (padded_random - real), (padded, padded_random, real)
    two = [BucketedOrder(lengths, 32, r, 2, seed=1, window=10) for r in range(2)]
    for b in range(5):
        cursor = Cursor(1, b)
        assert (np.concatenate([o.rank_items(cursor) for o in two]) == order.global_items(cursor)).all()


@pytest.mark.slow
def test_two_rank_finetune_matches_one_rank(runs):
    one, two = metrics(runs["1rank"]), metrics(runs["2rank"])
    assert sorted(one) == list(range(1, STEPS + 1))
    for s in one:
        assert one[s] == pytest.approx(two[s], rel=1e-5), s
    acc1, acc2 = metrics(runs["1rank"], "eval_dev/accuracy"), metrics(runs["2rank"], "eval_dev/accuracy")
    assert acc1 == acc2 and sorted(acc1) == [4, 8]
    best = json.loads((runs["1rank"] / "best" / "wellread.json").read_text())
    assert best["step"] in (4, 8) and best["task"] == "sst2"
    assert (runs["1rank"] / "tb").is_dir()


@pytest.mark.slow
def test_two_rank_evaluate_counts_every_example_once(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = runs["1rank"] / "export"
    data = ("--task", "sst2", "--data-root", str(FIXTURE_DATA))
    run(1, "evaluate", "--model", str(model), *data, "--out", str(tmp_path / "one.json"))
    run(2, "evaluate", "--model", str(model), *data, "--out", str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["examples"] == two["examples"] == 301 and two["ranks"] == 2  # odd: unequal shares
    assert one["accuracy"] == two["accuracy"]
    final = json.loads((model / "wellread.json").read_text())["metrics"]
    assert final["accuracy"] == pytest.approx(one["accuracy"])
    # and plain transformers (its own tokenizer and model classes, one unpadded sentence at a time) gives
    # the logits of our path (our tokenizer, length-sorted padded batches); fp32, only summation order differs
    from transformers import AutoTokenizer

    from trainer.data.encoding import load_task_data
    from trainer.data.tasks import resolve_task
    from trainer.data.tokenization import load_tokenizer, special_ids
    from trainer.launcher import DistEnv
    from trainer.models.classify import Classifier, predict

    hf = AutoModelForSequenceClassification.from_pretrained(model)
    tok = load_tokenizer(model)
    enc, loaded = load_task_data(resolve_task("sst2"), "dev", FIXTURE_DATA, tok, 128)
    ours = predict(Classifier(hf), enc, DistEnv(), 64, special_ids(tok).pad)
    assert float((ours.argmax(-1) == enc.labels).mean()) == one["accuracy"]
    plain_tok, plain = AutoTokenizer.from_pretrained(model), AutoModelForSequenceClassification.from_pretrained(model)
    assert plain.config.num_labels == 2 and not plain.training
    for i in (0, 1, int(np.argmax(enc.lengths))):  # the first dev sentences and the longest
        inputs = plain_tok(loaded.examples[i].text_a, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == enc.input_ids[i].tolist()
        with torch.no_grad():
            logits = plain(**inputs).logits[0]
        torch.testing.assert_close(logits, torch.from_numpy(ours[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_finetune_starts_from_a_pretraining_checkpoint(tmp_path):
    """model.name can be a DeepSpeed checkpoint of `wellread pretrain` (here ZeRO-3, 2 ranks)."""
    from conftest import DEMO_BOOKS
    from safetensors.torch import load_file

    from trainer.data.preprocess import PackOptions, preprocess
    from trainer.data.text_sources import SourceSpec
    from trainer.models.checkpoints import to_hf_dir

    corpus = tmp_path / "corpus"
    preprocess(
        SourceSpec(files=DEMO_BOOKS[:2], strip_gutenberg=True), corpus, None, PackOptions(seq_len=64), progress=False
    )
    recipe = tmp_path / "pt.yaml"
    recipe.write_text(f"""
data: {{train: {corpus}, verify: size}}
model: {{name: bert-L2-H128}}
train: {{steps: 3, micro_batch: 4, global_batch: 8, lr: 1.0e-3}}
engine: {{ds_config: zero3}}
run: {{out_dir: {tmp_path / "pt"}, log_every: 1}}
""")
    run(2, "pretrain", str(recipe))
    step_dir = tmp_path / "pt" / "checkpoints" / "step-0000003"
    converted = load_file(to_hf_dir(step_dir, tmp_path / "hf") / "model.safetensors")
    exported = load_file(tmp_path / "pt" / "export" / "model.safetensors")
    for name, value in exported.items():
        assert torch.allclose(converted[name], value), name
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"""
data: {{task: rte, data_root: {FIXTURE_DATA}}}
model: {{name: {tmp_path / "pt" / "checkpoints"}}}
train: {{steps: 2, micro_batch: 8, global_batch: 8}}
engine: {{ds_config: zero0}}
run: {{out_dir: {tmp_path / "ft"}}}
""")
    run(1, "finetune", str(ft))
    from transformers import AutoModelForSequenceClassification

    tuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft" / "export")
    assert tuned.config.num_labels == 2 and tuned.config.hidden_size == 128
    # a ZeRO-0 checkpoint converts too (weights straight from the model-states file)
    zero0_dir = to_hf_dir(tmp_path / "ft" / "checkpoints" / "step-0000002", tmp_path / "hf0")
    zero0 = load_file(zero0_dir / "model.safetensors")
    final = load_file(tmp_path / "ft" / "export" / "model.safetensors")
    assert set(zero0) == set(final) and all(torch.equal(zero0[k], final[k]) for k in final)


def test_unknown_task_is_a_one_line_error(tmp_path):
    from conftest import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {task: nosuchtask}\nmodel: {name: tiny}\n")
    proc = run_cli("finetune", str(recipe))
    assert proc.returncode == 2 and "nosuchtask" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
