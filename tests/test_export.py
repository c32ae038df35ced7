"""`wellread export`: a float16 copy of a pre-training checkpoint, its record, its MLM score, its refusals, and
that wellread's stages load it back in fp32 and train it.

One tiny pre-training run (in this process, a few seconds) is shared by the module's tests; they only read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIXTURE_DATA, tiny_corpus
from inprocess import LAUNCH_VARS, fit, one_process_fixture  # noqa: F401 (the one_process fixture)
from safetensors.torch import load_file

from trainer.cli import main as cli

STEP = 2  # a checkpoint before the last: the record must describe this step, not the end of the run


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its corpus) of a 4-step BERT-Tiny pre-training, saved every 2 steps (in this process)."""
    from trainer.launcher import init_distributed, shutdown

    root = tmp_path_factory.mktemp("pretrained")
    corpus = tiny_corpus(root / "corpus")
    recipe = root / "pt.yaml"
    recipe.write_text(f"""
data: {{train: {corpus}, verify: size}}
model: {{name: bert-L2-H128, dropout: 0.0}}
train: {{steps: 4, micro_batch: 8, global_batch: 8, lr: 1.0e-3, warmup_steps: 1, seed: 7}}
engine: {{ds_config: zero0}}
run: {{log_every: 1, ckpt_every: {STEP}, keep_checkpoints: 3, tensorboard: false}}
""")
    run = root / "pt"
    saved = dict(os.environ)  # init_distributed exports RANK, MASTER_PORT, ...: a later subprocess must not see them
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)
    try:
        env = init_distributed()
        try:
            assert fit(env, "pretrain", recipe, f"run.out_dir={run}") == 0
        finally:
            shutdown()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return run, corpus


def logged_at(run: Path, step: int) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in lines if r.get("step") == step and "train/tokens_seen" in r)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_float16_export_of_a_checkpoint(tmp_path, pretrained, capsys):
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from trainer.models.checkpoints import model_state_dict

    run, corpus = pretrained
    step_dir = run / "checkpoints" / f"step-{STEP:07d}"
    out = tmp_path / "models" / "tiny-fp16"
    args = ["export", str(step_dir), "--out", str(out), "--dtype", "float16"]
    assert cli([*args, "--eval-mlm", str(corpus), "--eval-max-sequences", "48"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "wellread.json"} <= set(snapshot(out))
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directory left"

    # the weights: every floating tensor float16, equal to the checkpoint's fp32 weights cast; nothing else lost
    exported, reference = load_file(out / "model.safetensors"), model_state_dict(step_dir)
    assert all(t.dtype == torch.float16 for t in exported.values())
    for name, tensor in exported.items():
        assert torch.equal(tensor, reference[name].to(torch.float16)), name
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # saved once, under their twins
    assert set(reference) - set(exported) <= tied and "cls.predictions.transform.dense.weight" in exported
    assert "cls.predictions.decoder.weight" not in exported  # = the word embeddings: not stored a second time

    # the record: this step's counters (metrics.jsonl), the run's recipe, the file's size and checksum
    record = json.loads((out / "wellread.json").read_text())
    logged = logged_at(run, STEP)
    assert record["step"] == STEP and record["tokens_seen"] == logged["train/tokens_seen"]
    assert record["examples_seen"] == logged["train/examples_seen"]
    assert record["dtype"] == "float16" and record["source"] == str(step_dir.absolute())
    assert record["recipe"] == yaml.safe_load((run / "config.yaml").read_text())
    assert record["params"] == sum(p.numel() for p in BertForMaskedLM(BertConfig.from_pretrained(out)).parameters())
    data = (out / "model.safetensors").read_bytes()
    assert record["size_bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()

    # the MLM score of the exported weights is what an independent `wellread evaluate-mlm` of DIR says
    scored = tmp_path / "mlm.json"
    evaluate = ["evaluate-mlm", "--model", str(out), "--data", str(corpus), "--max-sequences", "48"]
    assert cli([*evaluate, "--out", str(scored)]) == 0
    independent = json.loads(scored.read_text())
    mlm = record["mlm_eval"]
    assert mlm["data"] == str(corpus) and mlm["sequences"] == 48 == independent["sequences"]
    assert mlm["mlm_acc"] == independent["mlm_acc"] and mlm["loss"] == independent["loss"]
    assert 0 < mlm["mlm_acc"] < 1 and mlm["masked_tokens"] > 0

    # a second export to the same DIR is refused in one line, and DIR is untouched
    before = snapshot(out)
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wellread: error: ") and "--force" in err and "\n" not in err, err
    assert snapshot(out) == before

    # loadable by both Hugging Face classes; the MLM head is the trained one
    mlm_model, info = BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert BertForSequenceClassification.from_pretrained(out, num_labels=2).config.hidden_size == 128


def test_wellread_loads_a_float16_export_in_fp32_and_trains_it(tmp_path, pretrained, one_process):
    from trainer.models.classify import load_classifier
    from trainer.models.mlm import build_mlm

    run, _ = pretrained
    out = tmp_path / "tiny-fp16"
    assert cli(["export", str(run / "checkpoints"), "--out", str(out)]) == 0  # latest step, float16 by default
    exported = load_file(out / "model.safetensors")
    assert exported["bert.embeddings.word_embeddings.weight"].dtype == torch.float16
    assert json.loads((out / "wellread.json").read_text())["step"] == 4

    # the classifier loader (finetune, distill's classification student) and the MLM loader (distill's
    # DistilBERT student, pretrain from a directory) upcast: fp32 parameters holding the float16 values
    classifier = load_classifier(str(out), 2)
    student = build_mlm(str(out), vocab_size=30522)
    for model in (classifier, student):
        assert {p.dtype for p in model.parameters()} == {torch.float32}, type(model).__name__
        weight = model.bert.embeddings.word_embeddings.weight
        assert torch.equal(weight, exported["bert.embeddings.word_embeddings.weight"].float())

    # and `wellread finetune` trains from it (fp32 engine), exporting fp32 weights
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"""
data: {{task: sst2, max_train_examples: 16, max_seq_len: 32, eval_split: dev, data_root: {FIXTURE_DATA}}}
model: {{name: {out}}}
train: {{steps: 1, micro_batch: 8, global_batch: 8, lr: 1.0e-3}}
engine: {{ds_config: zero0}}
run: {{tensorboard: false}}
""")
    assert fit(one_process, "finetune", recipe, f"run.out_dir={tmp_path / 'ft'}") == 0
    tuned = load_file(tmp_path / "ft" / "export" / "model.safetensors")
    assert {t.dtype for t in tuned.values() if t.is_floating_point()} == {torch.float32}

    # --force replaces DIR with another dtype; a preset (no weights) is refused in one line
    assert cli(["export", str(run), "--out", str(out), "--dtype", "bfloat16", "--force"]) == 0
    assert load_file(out / "model.safetensors")["bert.embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    assert cli(["export", "bert-L2-H128", "--out", str(tmp_path / "preset")]) == 2
    assert not (tmp_path / "preset").exists()
