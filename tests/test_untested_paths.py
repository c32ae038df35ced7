"""Paths that no other test ran end to end: `wellread evaluate-mlm` as a command, classification KD from an online
teacher (no store), the study pipeline's pd_ft with a learning-rate search, and slurm/pretrain.sbatch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FIXTURE_DATA, run_cli, tiny_corpus
from distributed import metrics, run
from inprocess import fit, one_process_fixture  # noqa: F401 (the one_process fixture)


def save_hf(model, out: Path) -> Path:
    """A Hugging Face directory with wellread's tokenizer (what every stage loads)."""
    from trainer.data.tokenization import hf_tokenizer, load_tokenizer

    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(out)
    return out


def classifier(out: Path, seed: int, head_scale: float) -> Path:
    """A random 2-class BERT-Tiny; the head scaled up for confident, input-dependent soft labels."""
    from transformers import BertForSequenceClassification

    from trainer.models.zoo import bert_config

    torch.manual_seed(seed)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels = 2
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(head_scale)
    return save_hf(model, out)


def input_dependent_classifier(out: Path, texts: list[str], spread: float = 1.5) -> Path:
    """A random 2-class BERT-Tiny whose head reads the direction in which its pooled outputs vary most over
    `texts`, centred: its logits (z, -z), z ~ spread x a standardised projection, differ from text to text, so
    a teacher answer given to the wrong example changes the KD loss (a random head alone gives nearly the same
    logits for every text)."""
    from transformers import BertForSequenceClassification

    from trainer.data.tokenization import load_tokenizer
    from trainer.models.zoo import bert_config

    torch.manual_seed(1)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels = 2
    model = BertForSequenceClassification(cfg).eval()
    encoded = load_tokenizer().encode_batch(texts)
    width = max(len(e.ids) for e in encoded)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in encoded])
    with torch.no_grad():
        pooled = model.bert(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        mean = pooled.mean(0)
        direction = torch.linalg.svd(pooled - mean, full_matrices=False).Vh[0]
        scale = spread / float(((pooled - mean) @ direction).std())
        model.classifier.weight.copy_(torch.stack([direction, -direction]) * scale)
        shift = float(mean @ direction) * scale
        model.classifier.bias.copy_(torch.tensor([-shift, shift]))
    return save_hf(model, out)


# ---------------------------------------------------------------------------------------------- evaluate-mlm
def test_evaluate_mlm_command_equals_plain_transformers_on_the_same_masks(tmp_path):
    """The command's loss is the model's own mean cross-entropy over the masked tokens, computed here by plain
    transformers (BertForMaskedLM with labels, one unpadded sequence at a time) on the masks the command
    documents: mask_one keyed by (seed, 0, sequence index)."""
    from transformers import BertForMaskedLM

    from trainer.data.indexed import TokenShards
    from trainer.data.masking import MaskSpec, mask_one
    from trainer.data.tokenization import load_tokenizer, special_ids
    from trainer.models.zoo import bert_config

    torch.manual_seed(2)
    model_dir = save_hf(BertForMaskedLM(bert_config("bert-L2-H128")), tmp_path / "model")
    corpus = tmp_path / "corpus"
    tiny_corpus(corpus, seq_len=48)
    n, seed = 7, 5  # 7 sequences in batches of 3: a short last batch
    out = tmp_path / "m.json"
    args = ("--model", str(model_dir), "--data", str(corpus), "--seq-len", "48", "--batch-size", "3")
    proc = run_cli("evaluate-mlm", *args, "--max-sequences", str(n), "--seed", str(seed), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{") :]) == got
    assert got["sequences"] == n and got["seed"] == seed and got["model"] == str(model_dir)

    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    spec = MaskSpec(vocab_size=model.config.vocab_size, specials=special_ids(tok))
    shards = TokenShards(corpus)
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(n):
        masked, positions, labels = mask_one(
            np.asarray(shards[i]), np.random.default_rng([seed, 0, i]), spec, spec.special_table()
        )
        target = torch.full((len(masked),), -100)
        target[torch.from_numpy(positions)] = torch.from_numpy(labels.astype(np.int64))
        with torch.no_grad():
            result = model(input_ids=torch.from_numpy(masked.astype(np.int64))[None], labels=target[None])
        loss_sum += float(result.loss) * len(positions)
        correct += int((result.logits[0, positions].argmax(-1) == torch.from_numpy(labels.astype(np.int64))).sum())
        count += len(positions)
    assert count > n and got["masked_tokens"] == count
    assert got["loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert got["mlm_acc"] == correct / count
    assert got["perplexity"] == pytest.approx(math.exp(loss_sum / count), rel=1e-5)


# ---------------------------------------------------------------------------------------------- online teacher KD
@pytest.mark.slow
def test_online_teacher_kd_runs_end_to_end_and_matches_the_store_run(tmp_path, one_process):
    """KD with teacher.model and no store (the teacher runs in the loop) against the store the same teacher
    labeled: the same student, examples and order, so step 1's losses differ only by the store's fp16 rounding
    of the teacher logits z.

    The bound: with p = softmax(z/T), q the student's, KD = T^2 KL(p||q) and dKD/dz_k = T p_k (d_k - KL),
    d_k = log p_k - log q_k. Since sum_k p_k |d_k - KL| <= H(p) + CE(p, q) + KL = 2 H(p) + 2 KL <= 2 ln C + 2 KL,
    |dKD| <= T max|dz| (2 ln C + 2 KD / T^2) per example, and so for the batch mean; fp16 rounds to nearest:
    max|dz| <= 2^-11 max|z| (+ 2^-25 below fp16's normal range). Twice that bound, for the second-order term
    and the labeler's own fp32 batch arithmetic (padding, batch composition: ~1e-6 relative)."""
    from trainer.data.softlabels import SoftLabelStore
    from trainer.data.transfer import TransferSection, transfer_examples

    section = TransferSection(task="sst2", task_split="train", max_examples=64, data_root=str(FIXTURE_DATA))
    teacher = input_dependent_classifier(tmp_path / "teacher", [e.text_a for e in transfer_examples(section)])
    transfer = f"{{task: sst2, task_split: train, max_examples: 64, data_root: {FIXTURE_DATA}}}"
    label = tmp_path / "label.yaml"
    label.write_text(f"""
teacher: {teacher}
transfer: {transfer}
output: {{out_dir: {tmp_path / "store"}, kind: classification, batch_size: 32}}
""")
    run(1, "label", str(label))
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(f"""
data: {{store: {tmp_path / "store"}, verify: size}}
model: {{name: bert-L2-H128, dropout: 0.1}}
train: {{epochs: null, steps: 2, micro_batch: 16, global_batch: 16, lr: 1.0e-3, warmup_steps: 1, seed: 7}}
engine: {{ds_config: zero0}}
run: {{log_every: 1, tensorboard: false}}
""")
    stored, online = tmp_path / "stored", tmp_path / "online"
    assert fit(one_process, "distill", recipe, f"run.out_dir={stored}") == 0
    online_args = ("data.store=null", f"data.transfer={transfer}", f"teacher.model={teacher}")
    assert fit(one_process, "distill", recipe, f"run.out_dir={online}", *online_args) == 0

    source = json.loads((online / "distill-source.json").read_text())
    assert source["online_teacher"] == str(teacher) and "store" not in source
    assert (
        source["transfer_fingerprint"]
        == json.loads((stored / "distill-source.json").read_text())["transfer_fingerprint"]
    )
    info = json.loads((online / "export" / "wellread.json").read_text())
    assert info["stage"] == "distill" and info["step"] == 2 and info["kind"] == "classification"
    a, b = metrics(stored), metrics(online)
    assert sorted(a) == sorted(b) == [1, 2] and all(math.isfinite(v) for v in (*a.values(), *b.values()))
    assert metrics(online, "train/kd")[1] == b[1]  # alpha = 1: the loss is the KD term alone
    # step 1's student terms (CE on the gold labels, logged at weight 0 with alpha = 1) and the teacher's answers
    # (argmax: no fp16 rounding flips one here) are the same bit for bit: the same examples in the same order
    for term in ("train/ce", "train/gold_acc", "train/teacher_agreement"):
        assert metrics(stored, term)[1] == metrics(online, term)[1], term
    z = SoftLabelStore(tmp_path / "store", verify="size").batch(np.arange(64))["logits"]
    answers = z.argmax(1)
    assert 0.2 < answers.mean() < 0.8, "the teacher's answers depend on the text"

    t, classes, kd = 1.0, z.shape[1], max(a[1], b[1])
    dz = 2.0**-11 * float(np.abs(z).max()) + 2.0**-25
    tol = 2 * t * dz * (2 * math.log(classes) + 2 * kd / t**2)
    print(f"step 1: store {a[1]!r}, online {b[1]!r}, bound {tol:.3g}")
    assert abs(a[1] - b[1]) <= tol, (a[1], b[1], tol)
    assert tol < 0.25 * kd, f"the bound ({tol}) is too loose to say anything about KD {kd}"


# ---------------------------------------------------------------------------------------------- pd_ft + lr search
@pytest.mark.slow
def test_pd_ft_fine_tunes_the_pd_run_chosen_by_the_learning_rate_search(tmp_path):
    """The smallest study with pd_ft (it needs pd) and a search (two learning rates), one seed: pre-training,
    labeling, pd at each lr, the select node, pd_ft at each lr. A given teacher and a preprocessed corpus keep
    the teacher fine-tuning and preprocessing stages out (tests/test_pipeline.py runs those)."""
    from test_pipeline import final_eval, lines_with, pipeline, study_yaml

    corpus = tmp_path / "corpus"
    tiny_corpus(corpus, seq_len=64)
    teacher = classifier(tmp_path / "teacher", seed=1, head_scale=40.0)
    out, lrs = tmp_path / "study", [1e-3, 0.0]
    recipe = study_yaml(
        tmp_path / "s.yaml",
        out,
        ["pd", "pd_ft"],
        [1],
        search__lr=lrs,
        corpus={"dir": str(corpus)},
        teacher={"model": str(teacher)},
        transfer__max_examples=64,
    )
    proc = pipeline(str(recipe))
    pd_runs = {lr: f"runs/pd/bert-L2-H128/nall/s1/lr{lr:g}" for lr in lrs}
    ft_runs = {lr: f"runs/pd_ft/bert-L2-H128/n64/s1/lr{lr:g}" for lr in lrs}
    select = "select/pd/bert-L2-H128/nall"
    assert lines_with(proc.stdout, "running") == {
        "pretrain/bert-L2-H128",
        "softlabels",
        "teacher-eval",
        select,
        *pd_runs.values(),
        *ft_runs.values(),
    }
    # the search: the pd lr with the best dev accuracy (one seed: the best run; ties: the first lr), read here
    # from each run's own metrics.jsonl
    pd_scores = {lr: final_eval(out / pd_runs[lr]) for lr in lrs}
    best = max(lrs, key=lambda lr: pd_scores[lr])
    # lr 0 keeps the pre-trained student's answer, lr 1e-3 takes the teacher's other one: the search has a
    # choice to make, and the right one is not the first lr listed
    assert best == 0.0 and pd_scores[0.0] != pd_scores[1e-3], pd_scores
    chosen = json.loads((out / select / "select.json").read_text())
    assert chosen["lr"] == best and chosen["mean"] == pytest.approx(pd_scores[best])
    assert chosen["by_lr"] == {f"{lr:g}": {"1": pd_scores[lr]} for lr in lrs}
    assert (out / select / "s1").resolve() == (out / pd_runs[best] / "export").resolve()
    for lr in lrs:  # each pd_ft run fine-tunes the chosen pd model at its own lr, on the 64 labels
        config = yaml.safe_load((out / ft_runs[lr] / "config.yaml").read_text())
        assert config["model"]["name"] == str(out / select / "s1")
        assert config["train"]["lr"] == lr and config["data"]["max_train_examples"] == 64
        assert "eval_dev/accuracy" in (out / ft_runs[lr] / "metrics.jsonl").read_text()
    # the report: per method, the lr with the best mean over seeds, and the value of that run
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"pd", "pd_ft"}
    ft_scores = {lr: final_eval(out / ft_runs[lr]) for lr in lrs}
    assert ft_scores[0.0] == pd_scores[best]  # at lr 0, pd_ft's model is the chosen pd model itself
    for method, scores, runs in (("pd", pd_scores, pd_runs), ("pd_ft", ft_scores, ft_runs)):
        row, lr = rows[method], max(lrs, key=lambda lr, s=scores: s[lr])
        assert row["lr"] == lr and row["mean"] == pytest.approx(scores[lr], abs=1e-12), (method, row)
        assert Path(row["seeds"]["1"]["run_dir"]) == out / runs[lr]


# ---------------------------------------------------------------------------------------------- slurm
@pytest.mark.slow
@pytest.mark.slurm
def test_pretrain_sbatch_runs_to_its_export(tmp_path):
    """slurm/pretrain.sbatch as documented (`sbatch slurm/pretrain.sbatch RECIPE key=value`), on the local cluster."""
    from test_slurm import TIMEOUT, job_env, log_of, sbatch, states, wait_jobs

    tiny_corpus(tmp_path / "corpus")
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(f"""
data: {{train: {tmp_path / "corpus"}, verify: size}}
model: {{name: bert-L2-H128, dropout: 0.0}}
train: {{steps: 2, micro_batch: 4, global_batch: 4, lr: 1.0e-3, warmup_steps: 1}}
engine: {{ds_config: zero0}}
run: {{log_every: 1, tensorboard: false}}
""")
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch("-o", str(log), "--time=10", "slurm/pretrain.sbatch", str(recipe), f"run.out_dir={out}", env=job_env())
    wait_jobs(job, timeout=TIMEOUT)
    text = log_of(log)
    assert states(job) == ["COMPLETED"], text[-4000:]
    assert "1 rank(s) via slurm" in text and "exported Hugging Face model to" in text
    assert sorted(metrics(out)) == [1, 2]
    info = json.loads((out / "export" / "wellread.json").read_text())
    assert info["stage"] == "pretrain" and info["step"] == 2
    assert json.loads((out / "export" / "config.json").read_text())["num_hidden_layers"] == 2
