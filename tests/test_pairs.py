"""Sentence pairs and regression through labeling and distillation (RTE, MRPC fixtures; a regression task read
from MRPC's pairs).

A pair's soft label must be the teacher's answer on both sentences, tokenized as fine-tuning tokenizes them
(segment ids, longest-first truncation): checked here against plain transformers (the teacher's own
BertTokenizerFast and BertForSequenceClassification), and shown to differ from its answer on the first
sentence alone. Every arity mismatch (a pair teacher fed single texts, the reverse, a pair row without its
second text, a student scored on the other kind) is refused in one line with nothing written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DATA
from distributed import metrics, run
from inprocess import one_process_fixture  # noqa: F401 (the one_process fixture)

FP16_REL = 2.0**-11  # fp16 rounds to nearest: relative error at most half its 2^-10 spacing
FP16_ABS = 2.0**-25  # below fp16's normal range (6.1e-5) the spacing is 2^-24


# ---------------------------------------------------------------------------------------------- teachers
def pair_teacher(out: Path, task: str, seed: int) -> Path:
    """A random BERT-Tiny classifier with its head scaled up (confident, input-dependent logits: a test that a label
    belongs to the pair, not to its first sentence, needs them to vary) and the record a fine-tuning export of a pair
    task writes (`inputs: pair`; tests/test_pipeline_tasks.py checks that fine-tuning writes it)."""
    from transformers import BertForSequenceClassification

    from trainer.data.tokenization import hf_tokenizer, load_tokenizer
    from trainer.models.zoo import bert_config

    torch.manual_seed(seed)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels = 2
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(out)
    (out / "wellread.json").write_text(json.dumps({"stage": "finetune", "task": task, "inputs": "pair"}))
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair-teachers")
    return {task: pair_teacher(root / task, task, seed) for seed, task in enumerate(("rte", "mrpc"), 1)}


def label_recipe(path: Path, teacher: Path, out: Path, transfer: str) -> Path:
    path.write_text(f"""
teacher: {teacher}
transfer: {transfer}
output: {{out_dir: {out}, kind: classification, part_examples: 40, batch_size: 16, max_seq_len: 128}}
""")
    return path


def task_transfer(task: str, data_root: Path = FIXTURE_DATA) -> str:
    return f"{{task: {task}, task_split: train, data_root: {data_root}}}"


@pytest.fixture(scope="module")
def stores(tmp_path_factory, teachers) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair-stores")
    for task, teacher in teachers.items():
        run(1, "label", str(label_recipe(root / f"{task}.yaml", teacher, root / task, task_transfer(task))))
    return {task: root / task for task in teachers}


# ---------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("task", ["rte", "mrpc"])
def test_a_stored_pair_label_is_the_teachers_answer_on_the_pair(task, teachers, stores):
    from transformers import BertForSequenceClassification, BertTokenizerFast

    from trainer.data.softlabels import SoftLabelStore
    from trainer.data.tasks import load_split, resolve_task

    spec = resolve_task(task)
    examples = load_split(spec, "train", FIXTURE_DATA).examples
    store = SoftLabelStore(stores[task])
    assert store.inputs == "pair" and len(store) == len(examples)
    assert json.loads((teachers[task] / "wellread.json").read_text())["inputs"] == "pair"
    model = BertForSequenceClassification.from_pretrained(teachers[task]).eval()
    tok = BertTokenizerFast.from_pretrained(teachers[task])

    def logits(*texts: str) -> np.ndarray:
        inputs = tok(*texts, truncation="longest_first", max_length=128, return_tensors="pt")
        with torch.no_grad():
            return model(**inputs).logits[0].double().numpy()

    got = store.batch(np.arange(len(store)))
    assert got["example_ids"].tolist() == list(range(len(examples)))
    assert got["gold"].tolist() == [e.label for e in examples]
    moved = 0
    for i, e in enumerate(examples):
        pair, first = logits(e.text_a, e.text_b), logits(e.text_a)
        # fp16 storage, plus the labeler's padded fp32 batches (attention-masked padding: ~1e-6 of the logits)
        tol = FP16_REL * np.abs(pair) + FP16_ABS + 1e-5 * (1 + np.abs(pair))
        assert (np.abs(got["logits"][i] - pair) <= tol).all(), (i, got["logits"][i], pair)
        moved += bool((np.abs(pair - first) > 10 * tol).any())
    assert moved >= 0.9 * len(examples), f"only {moved}/{len(examples)} pairs label unlike their first sentence"


def test_pair_transfer_from_files_and_datasets_equals_the_tasks_split(tmp_path):
    """Pairs from JSONL / TSV files and a `datasets` dataset with two named fields are the task split's examples."""
    from trainer.data.tasks import load_split, resolve_task
    from trainer.data.transfer import TransferSection, transfer_examples, transfer_fingerprint, transfer_inputs

    examples = load_split(resolve_task("rte"), "train", FIXTURE_DATA).examples
    jsonl, tsv = tmp_path / "pairs.jsonl", tmp_path / "pairs.tsv"
    jsonl.write_text("".join(json.dumps({"premise": e.text_a, "hypothesis": e.text_b}) + "\n" for e in examples))
    tsv.write_text("premise\thypothesis\n" + "".join(f"{e.text_a}\t{e.text_b}\n" for e in examples))
    for path in (jsonl, tsv):
        t = TransferSection(files=[str(path)], text_field="premise", text_b_field="hypothesis")
        assert transfer_inputs(t) == "pair"
        got = list(transfer_examples(t))
        assert [(g.text_a, g.text_b) for g in got] == [(e.text_a.strip(), e.text_b.strip()) for e in examples]
        assert all(g.label is None for g in got)
    rows = TransferSection(hf_dataset=str(jsonl), text_field="premise", text_b_field="hypothesis")  # `datasets`
    assert [(g.text_a, g.text_b) for g in transfer_examples(rows)] == [(e.text_a, e.text_b) for e in examples]
    one = TransferSection(files=[str(jsonl)], text_field="premise", text_b_field="hypothesis")
    other = TransferSection(files=[str(jsonl)], text_field="hypothesis", text_b_field="premise")
    assert transfer_fingerprint(one) != transfer_fingerprint(other)  # both fields are part of the identity
    single = TransferSection(task="sst2", data_root=str(FIXTURE_DATA))
    assert transfer_inputs(single) == "single"


# ---------------------------------------------------------------------------------------------- refusals
def refused(proc, *needles: str) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("wellread: error:"), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def label_refused(capsys, recipe: Path, *needles: str) -> None:
    """`wellread label RECIPE` in this process (these refusals come before any process group or file): exit 2 and
    one line on stderr."""
    from trainer import cli

    capsys.readouterr()
    code = cli.main(["label", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("wellread: error:"), (code, err)
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_labeling_refuses_every_arity_mismatch_and_writes_nothing(tmp_path, teachers, capsys):
    rte = teachers["rte"]
    # a pair teacher given single sentences
    out = tmp_path / "single-into-pair"
    recipe = label_recipe(tmp_path / "a.yaml", rte, out, task_transfer("sst2"))
    label_refused(capsys, recipe, "fine-tuned on sentence pairs but the transfer set gives single texts")
    assert not out.exists()
    # a single-text teacher (its record says so) given pairs
    single = tmp_path / "single-teacher"
    shutil.copytree(rte, single)
    record = json.loads((single / "wellread.json").read_text())
    (single / "wellread.json").write_text(json.dumps({**record, "task": "sst2", "inputs": "single"}))
    out = tmp_path / "pair-into-single"
    recipe = label_recipe(tmp_path / "b.yaml", single, out, task_transfer("rte"))
    label_refused(capsys, recipe, "fine-tuned on single texts but the transfer set gives sentence pairs")
    assert not out.exists()
    # pairs cannot be cut into sentences
    recipe = label_recipe(tmp_path / "e.yaml", rte, out, "{task: rte, split_sentences: true, data_root: x}")
    label_refused(capsys, recipe, "split_sentences")
    assert not out.exists()
    # a pair task's split with a row that lost its second sentence: found while the transfer set is read, in the
    # labeling process itself (after its process group starts), so a real process
    root = tmp_path / "data"
    shutil.copytree(FIXTURE_DATA / "glue" / "RTE", root / "glue" / "RTE")
    lines = (root / "glue" / "RTE" / "train.tsv").read_text().splitlines(keepends=True)
    index, first, _second, gold = lines[4].rstrip("\n").split("\t")
    lines[4] = f"{index}\t{first}\t\t{gold}\n"
    (root / "glue" / "RTE" / "train.tsv").write_text("".join(lines))
    out = tmp_path / "half-pair"
    proc = run(1, "label", str(label_recipe(tmp_path / "c.yaml", rte, out, task_transfer("rte", root))), expect=None)
    refused(proc, "train.tsv:5", "sentence2")
    assert not out.exists()
    # pair files whose record lacks the second field
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"p": "A man sleeps.", "h": "Someone rests."}) + "\n" + json.dumps({"p": "x"}) + "\n")
    out = tmp_path / "no-field"
    transfer = f"{{files: [{jsonl}], text_field: p, text_b_field: h}}"
    proc = run(1, "label", str(label_recipe(tmp_path / "d.yaml", rte, out, transfer)), expect=None)
    refused(proc, "pairs.jsonl:2", "no 'h' field")
    assert not out.exists()


def distill_recipe(path: Path, store: Path, eval_task: str, **extra: str) -> Path:
    teacher = f"teacher: {{model: {extra['teacher']}}}\n" if "teacher" in extra else ""
    transfer = f", transfer: {extra['transfer']}" if "transfer" in extra else ""
    path.write_text(f"""
data: {{store: {store}, eval_task: {eval_task}, data_root: {FIXTURE_DATA}, verify: size{transfer}}}
{teacher}model: {{name: bert-L2-H128, dropout: 0.0}}
loss: {{alpha: {extra.get("alpha", 1.0)}}}
train: {{epochs: 1, micro_batch: 16, global_batch: 32, lr: 2.0e-3, warmup_steps: 1, seed: 5}}
engine: {{ds_config: zero0}}
run: {{log_every: 1, tensorboard: false}}
""")
    return path


def test_distillation_refuses_a_student_scored_on_the_other_arity(tmp_path, stores):
    out = tmp_path / "run"
    recipe = distill_recipe(tmp_path / "kd.yaml", stores["rte"], "sst2")
    proc = run(1, "distill", str(recipe), f"run.out_dir={out}", expect=None)
    refused(proc, "single texts and sentence pairs mixed", "data.eval_task sst2: single texts")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- distillation
def test_pair_distillation_feeds_the_student_the_pairs_the_teacher_labeled(tmp_path, stores, teachers, one_process):
    """The distill stage's batches (its own encoding of the transfer set) are the pairs the store's labels are for:
    the teacher run online on a batch gives the stored logits (fp16 rounding), with segment ids 1 present."""
    from trainer.config import load_config
    from trainer.recipes.distill import DistillRecipe
    from trainer.stages.distill import distill_stage

    recipe = distill_recipe(tmp_path / "kd.yaml", stores["rte"], "rte", teacher=str(teachers["rte"]))
    stage = distill_stage(load_config(DistillRecipe, recipe, [f"run.out_dir={tmp_path / 'run'}"]))
    stage.prepare(one_process, str(recipe))
    stage.build(one_process, str(recipe))
    batch = stage.batch(np.arange(len(stage.store)), 0)
    assert int(batch["token_type_ids"].max()) == 1
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
    online, _ = stage.teacher.classify(inputs)
    stored = batch["teacher_logits"]
    tol = FP16_REL * online.abs() + FP16_ABS + 1e-5 * (1 + online.abs())
    assert ((stored - online).abs() <= tol).all()
    assert stage.source["inputs"] == "pair"


def test_patient_kd_on_pairs_meets_the_teachers_cls_states_of_the_pair(tmp_path, teachers, one_process):
    """PKD's [CLS] targets of a pair, stored (output.cls_layers) or online, are the teacher's states on the pair:
    the store against plain transformers, and the distill stage's batch from the store against the online teacher."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    from trainer.config import load_config
    from trainer.data.softlabels import SoftLabelStore
    from trainer.data.tasks import load_split, resolve_task
    from trainer.models.teacher import Teacher
    from trainer.recipes.distill import DistillRecipe
    from trainer.stages.distill import distill_stage

    teacher, out = teachers["rte"], tmp_path / "store"
    recipe = label_recipe(tmp_path / "label.yaml", teacher, out, task_transfer("rte"))
    run(1, "label", str(recipe), "output.cls_layers=[1,2]")
    store = SoftLabelStore(out)
    assert store.cls_layers == [1, 2] and store.inputs == "pair"
    examples = load_split(resolve_task("rte"), "train", FIXTURE_DATA).examples
    model = BertForSequenceClassification.from_pretrained(teacher).eval()
    tok = BertTokenizerFast.from_pretrained(teacher)
    got = store.batch(np.arange(len(store)))["cls"]
    for i in (0, 31, len(examples) - 1):
        inputs = tok(examples[i].text_a, examples[i].text_b, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            states = model(**inputs, output_hidden_states=True).hidden_states
        want = torch.stack([states[t][0, 0] for t in (1, 2)]).double().numpy()
        tol = FP16_REL * np.abs(want) + FP16_ABS + 1e-5 * (1 + np.abs(want))
        assert (np.abs(got[i] - want) <= tol).all(), i
    distill = distill_recipe(tmp_path / "pkd.yaml", out, "rte", teacher=str(teacher))
    stage = distill_stage(
        load_config(DistillRecipe, distill, [f"run.out_dir={tmp_path / 'run'}", "loss.beta=1.0", "teacher.model=null"])
    )
    stage.prepare(one_process, str(distill))
    stage.build(one_process, str(distill))
    batch = stage.batch(np.arange(16), 0)
    assert stage.source["pkd_teacher_states"] == "store" and int(batch["token_type_ids"].max()) == 1
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
    _, cls = Teacher(teacher, "classification").classify(inputs, stage.teacher_layers)
    tol = FP16_REL * cls.abs() + FP16_ABS + 1e-5 * (1 + cls.abs())
    assert ((batch["teacher_cls"] - cls).abs() <= tol).all()


@pytest.mark.slow
def test_pair_distillation_end_to_end_records_pairs(tmp_path, stores):
    out = tmp_path / "run"
    run(1, "distill", str(distill_recipe(tmp_path / "kd.yaml", stores["mrpc"], "mrpc")), f"run.out_dir={out}")
    info = json.loads((out / "export" / "wellread.json").read_text())
    assert info["inputs"] == "pair" and info["source"]["inputs"] == "pair"
    assert {"accuracy", "f1"} <= set(info["metrics"]) and 0 <= info["metrics"]["f1"] <= 1
    assert all(math.isfinite(v) for v in metrics(out).values())


# ---------------------------------------------------------------------------------------------- regression
def regression_task(tmp_path: Path) -> Path:
    """A regression task over MRPC's real pairs: its 0/1 paraphrase label read as a score."""
    path = tmp_path / "mrpc_score.yaml"
    path.write_text(f"""
name: mrpc_score
format: glue_tsv
train: {FIXTURE_DATA / "glue" / "MRPC" / "train.tsv"}
dev: {FIXTURE_DATA / "glue" / "MRPC" / "dev.tsv"}
text_a: "#1 String"
text_b: "#2 String"
label: Quality
labels: null
""")
    return path


def regression_teacher(out: Path, seed: int = 4) -> Path:
    """A random one-output BERT-Tiny (a regression head, problem_type regression) with a wellread record saying it
    scores pairs; its head scaled so its scores spread over a few units."""
    from transformers import BertForSequenceClassification

    from trainer.data.tokenization import hf_tokenizer, load_tokenizer
    from trainer.models.zoo import bert_config

    torch.manual_seed(seed)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels, cfg.problem_type = 1, "regression"
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(out)
    (out / "wellread.json").write_text(json.dumps({"stage": "finetune", "inputs": "pair"}))
    return out


def test_regression_term_against_numpy_float64():
    """alpha * sum (s - t)^2 + (1 - alpha) * sum over known gold (s - g)^2, rows of weight 0 left out; the float32
    sums of n terms are within n * 2^-24 of the exact sum, relative to the sum of the terms' sizes."""
    from transformers import BertForSequenceClassification

    from trainer.models.distiller import ClassifierDistiller
    from trainer.models.zoo import bert_config

    torch.manual_seed(0)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels = 1
    distiller = ClassifierDistiller(BertForSequenceClassification(cfg).eval(), temperature=3.0, alpha=0.3)
    n, length = 12, 9
    ids = torch.randint(1000, 5000, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[3, 5:] = 0
    types = torch.zeros(n, length, dtype=torch.long)
    types[:, 4:] = 1
    weight = torch.ones(n)
    weight[7] = 0.0  # a filler row
    teacher = torch.randn(n, 1) * 2
    gold = torch.tensor([0.5, float("nan"), 3.0, 1.0, float("nan"), 4.5, 2.0, 1.0, 0.0, 5.0, 2.5, float("nan")])
    loss, stats = distiller(ids, mask, types, weight, teacher, gold)
    s = distiller.logits(ids, mask, types)[:, 0].detach().double().numpy()
    t, g, w = teacher[:, 0].double().numpy(), gold.double().numpy(), weight.double().numpy()
    kd_terms = w * (s - t) ** 2
    known = (w > 0) & ~np.isnan(g)
    gold_terms = np.where(known, (s - np.nan_to_num(g)) ** 2, 0.0)
    expected = 0.3 * kd_terms.sum() + 0.7 * gold_terms.sum()
    bound = 2 * n * 2.0**-24 * (kd_terms.sum() + gold_terms.sum()) + 1e-12
    assert abs(float(loss.detach()) - expected) <= bound, (float(loss.detach()), expected, bound)
    assert abs(float(stats["kd"]) - kd_terms.sum()) <= bound
    assert abs(float(stats["gold_mse"]) - gold_terms.sum()) <= bound
    assert "agree" not in stats and not any(k.startswith("teacher_class/") for k in stats)


@pytest.fixture(scope="module")
def regression_store(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("regression")
    task = regression_task(root)
    teacher = regression_teacher(root / "teacher")
    recipe = label_recipe(root / "label.yaml", teacher, root / "store", f"{{task: {task}, task_split: train}}")
    run(1, "label", str(recipe))
    return {"store": root / "store", "task": task, "teacher": teacher}


def test_a_regression_store_keeps_the_teachers_scores_and_the_gold_scores(regression_store):
    from transformers import BertForSequenceClassification, BertTokenizerFast

    from trainer.data.softlabels import SoftLabelStore
    from trainer.data.tasks import load_split, resolve_task

    store = SoftLabelStore(regression_store["store"])
    assert store.regression and store.num_classes == 1 and store.inputs == "pair" and store.has_gold
    examples = load_split(resolve_task(str(regression_store["task"])), "train").examples
    got = store.batch(np.arange(len(store)))
    assert got["gold"].dtype == np.float32 and got["gold"].tolist() == [float(e.label) for e in examples]
    model = BertForSequenceClassification.from_pretrained(regression_store["teacher"]).eval()
    tok = BertTokenizerFast.from_pretrained(regression_store["teacher"])
    for i in (0, 17, len(examples) - 1):
        inputs = tok(examples[i].text_a, examples[i].text_b, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            score = float(model(**inputs).logits[0, 0])
        tol = FP16_REL * abs(score) + FP16_ABS + 1e-5 * (1 + abs(score))
        assert abs(float(got["logits"][i, 0]) - score) <= tol


@pytest.mark.slow
def test_regression_distillation_two_ranks_equal_one_and_report_correlations(tmp_path, regression_store):
    recipe = distill_recipe(tmp_path / "kd.yaml", regression_store["store"], str(regression_store["task"]), alpha="0.5")
    runs = {n: tmp_path / f"{n}rank" for n in (1, 2)}
    for n, out in runs.items():
        run(n, "distill", str(recipe), f"run.out_dir={out}", "engine.ds_config=zero2")
    one, two = metrics(runs[1]), metrics(runs[2])
    assert sorted(one) == sorted(two) and len(one) >= 3
    for step in one:  # gloo sums in another order than one rank's accumulation: float32 rounding only
        assert math.isfinite(one[step]) and one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-7)
    assert metrics(runs[1], "train/gold_mse") and metrics(runs[1], "train/kd")
    info = json.loads((runs[1] / "export" / "wellread.json").read_text())
    assert {"pearson", "spearman"} <= set(info["metrics"])
    assert all(-1 <= info["metrics"][k] <= 1 for k in ("pearson", "spearman"))
