"""One teacher (trainer/models/teacher.py) for `wellread label` and `wellread distill`: the same batch gives both
commands the same numbers, bit for bit, and the same numbers as the plain Hugging Face model; a teacher whose head
would be newly initialised (a plain encoder such as MiniLM) is refused in one line; the labeling writer takes every
kind's roles through one call (SoftLabelWriter.add) and writes the same bytes as the per-kind calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DATA, run_cli

N = 12  # transfer examples


def _save(model, out: Path) -> Path:
    from trainer.data.tokenization import hf_tokenizer, load_tokenizer

    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from transformers import BertForSequenceClassification

    from trainer.models.zoo import bert_config

    torch.manual_seed(3)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels = 3
    return _save(BertForSequenceClassification(cfg), tmp_path_factory.mktemp("teacher") / "clf")


@pytest.fixture(scope="module")
def mlm_teacher(tmp_path_factory) -> Path:
    from transformers import BertForMaskedLM

    from trainer.models.zoo import bert_config

    torch.manual_seed(4)
    return _save(BertForMaskedLM(bert_config("bert-L2-H128")), tmp_path_factory.mktemp("teacher") / "mlm")


def _distill(tmp_path: Path, *overrides: str):
    """A distill stage through its own entry (distill_stage, prepare, build), on the SST-2 fixture slice."""
    from trainer.config import load_config
    from trainer.launcher import DistEnv
    from trainer.recipes.distill import DistillRecipe
    from trainer.stages.distill import distill_stage

    recipe = tmp_path / "d.yaml"
    recipe.write_text(f"""
data: {{transfer: {{task: sst2, task_split: train, max_examples: {N}, data_root: {FIXTURE_DATA}}}}}
model: {{name: bert-L2-H128}}
engine: {{ds_config: zero2}}
run: {{out_dir: {tmp_path / "out"}, tensorboard: false}}
""")
    stage = distill_stage(load_config(DistillRecipe, recipe, list(overrides)))
    stage.prepare(DistEnv(), str(recipe))
    stage.build(DistEnv(), str(recipe))
    return stage


def test_label_and_distill_get_the_same_classifier_outputs(tmp_path, classifier):
    from transformers import BertForSequenceClassification

    from trainer.models.teacher import Teacher, teacher_fingerprint
    from trainer.recipes.label import LabelOutput
    from trainer.stages.distill import ClassifierDistill
    from trainer.stages.label import soft_labels

    stage = _distill(tmp_path, f"teacher.model={classifier}", "loss.beta=1")
    assert isinstance(stage, ClassifierDistill) and stage.teacher_layers == [1]
    batch = stage.batch(np.arange(N), 0)  # distill: the online teacher's logits and [CLS] states
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    labeled = soft_labels(Teacher(classifier, "classification"), inputs, LabelOutput(cls_layers=[1, 2]))
    assert labeled.keys() == {"logits", "cls"}
    assert np.array_equal(labeled["logits"], batch["teacher_logits"].numpy())
    assert np.array_equal(labeled["cls"][:, [0]], batch["teacher_cls"].numpy())
    # ... and both are the plain model's forward
    hf = BertForSequenceClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True)
    assert torch.equal(ref.logits, batch["teacher_logits"])
    assert torch.equal(
        torch.stack([ref.hidden_states[t][:, 0] for t in (1, 2)], dim=1), torch.from_numpy(labeled["cls"])
    )
    assert stage.teacher.fingerprint() == teacher_fingerprint(classifier)
    assert stage.source["online_teacher"] == str(classifier)


def test_label_and_distill_get_the_same_mlm_distributions(tmp_path, mlm_teacher):
    from trainer.models.teacher import Teacher
    from trainer.recipes.label import LabelOutput
    from trainer.stages.label import soft_labels

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 1000, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    batch["attention_mask"][1, 6:] = 0
    teacher = Teacher(mlm_teacher, "mlm")
    logits, hidden = teacher.mlm(batch, hidden=True)  # distill's view
    labeled = soft_labels(teacher, batch, LabelOutput(kind="mlm", topk=5))  # label's view
    values, ids = torch.log_softmax(logits, dim=-1).topk(5, dim=-1)
    assert np.array_equal(labeled["topk_ids"], ids.numpy())
    assert np.array_equal(labeled["topk_logprobs"], values.numpy())
    assert hidden.shape == (3, 9, 128) and hidden.dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training


def test_a_preset_or_a_directory_without_weights_is_not_a_teacher(tmp_path):
    from trainer.errors import UserError
    from trainer.models.teacher import teacher_dir

    with pytest.raises(UserError, match="is a preset"):
        teacher_dir("bert-L2-H128", "teacher.model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no model.safetensors"):
        teacher_dir(str(tmp_path), "teacher")


def test_an_encoder_without_an_mlm_head_is_not_an_mlm_teacher(minilm_dir):
    from trainer.errors import UserError
    from trainer.models.teacher import Teacher

    with pytest.raises(UserError) as err:
        Teacher(minilm_dir, "mlm")
    message = str(err.value)
    assert "\n" not in message and "6 weights" in message and "cls.predictions." in message
    assert "wellread pretrain" in message


def test_an_encoder_without_a_trained_classifier_is_not_a_classification_teacher(minilm_dir, mlm_teacher):
    from trainer.errors import UserError
    from trainer.models.teacher import Teacher

    with pytest.raises(UserError, match=r"2 weights .*\(classifier\.bias, classifier\.weight\); fine-tune it first"):
        Teacher(minilm_dir, "classification")
    with pytest.raises(UserError, match=r"4 weights .*bert\.pooler.*wellread finetune"):  # an MLM model: no pooler
        Teacher(mlm_teacher, "classification")


def test_saved_heads_are_teachers(classifier, mlm_teacher):
    from trainer.models.teacher import Teacher

    assert Teacher(classifier, "classification").num_classes == 3
    assert Teacher(mlm_teacher, "mlm").vocab_size == 30522


def test_distill_refuses_an_untrained_teacher_before_building_the_student(tmp_path):
    """The recipe's own command with MiniLM's encoder as the MLM teacher: one line, no traceback, nothing built
    (the corpus does not exist: reading it, the first step of building the student, would fail otherwise)."""
    out = tmp_path / "out"
    proc = run_cli(
        "distill",
        "recipes/distill_distilbert_minilm.yaml",
        "teacher.model=minilm",
        "model.name=minilm",
        f"data.corpus={tmp_path / 'no-shards'}",
        f"run.out_dir={out}",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "not a trained mlm teacher" in proc.stderr and "cls.predictions." in proc.stderr
    assert not out.exists()


def test_the_recipe_picks_the_stage():
    from trainer.config import load_config
    from trainer.recipes.distill import DistillRecipe
    from trainer.stages.distill import ClassifierDistill, MLMDistill, distill_stage

    def stage(*overrides: str):
        return distill_stage(load_config(DistillRecipe, None, ["teacher.model=t", *overrides]))

    online_mlm, online_clf = stage("data.corpus=shards"), stage()
    assert type(online_mlm) is MLMDistill and online_mlm.t == 2.0 and online_mlm.eval_prefix == "eval"
    assert type(online_clf) is ClassifierDistill and online_clf.t == 1.0 and online_clf.eval_prefix == "eval_dev"
    assert stage("data.corpus=shards", "loss.temperature=3").t == 3.0


@pytest.mark.parametrize("kind", ["classification", "classification+cls", "mlm"])
def test_one_writer_call_for_every_kind_writes_the_same_bytes(tmp_path, kind):
    from trainer.data.softlabels import SoftLabelWriter
    from trainer.data.softlabels.format import labeled_roles

    rng = np.random.default_rng(0)
    n, c, k, vocab = 10, 3, 4, 50
    ids = rng.permutation(n)
    gold = rng.integers(-1, c, n)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    cls = rng.normal(size=(n, 2, 8)).astype(np.float32)
    lengths = rng.integers(1, 7, n)
    tokens = [rng.integers(0, vocab, t) for t in lengths]
    top_ids = [rng.integers(0, vocab, (t, k)) for t in lengths]
    top_lp = [-rng.random((t, k)).astype(np.float32) for t in lengths]
    base = {
        "classification": dict(num_classes=c),
        "classification+cls": dict(num_classes=c, cls_layers=[1, 2], hidden_size=8, teacher_layers=2),
        "mlm": dict(k=k, vocab_size=vocab),
    }[kind]
    store_kind = kind.split("+")[0]
    files = {}
    for how in ("per kind", "add"):
        with SoftLabelWriter(tmp_path / how, "w0", store_kind, part_examples=4, **base) as w:
            for a in (0, 3, 7):
                sl = slice(a, {0: 3, 3: 7, 7: n}[a])
                if how == "add":
                    given = {
                        "gold": gold[sl],
                        "logits": list(logits[sl]),
                        "cls": list(cls[sl]),
                        "tokens": tokens[sl],
                        "topk_ids": top_ids[sl],
                        "topk_logprobs": top_lp[sl],
                    }
                    w.add(ids[sl], **{role: given[role] for role in labeled_roles(w.settings)})
                elif store_kind == "mlm":
                    w.add_mlm(ids[sl], tokens[sl], top_ids[sl], top_lp[sl])
                else:
                    w.add_classification(ids[sl], logits[sl], gold[sl], cls[sl] if "cls" in kind else None)
        files[how] = {p.name: p.read_bytes() for p in sorted((tmp_path / how).iterdir())}
    assert files["add"] == files["per kind"] and len(files["add"]) > 4
    with SoftLabelWriter(tmp_path / "wrong", "w0", store_kind, **base) as w, pytest.raises(ValueError, match="roles"):
        w.add(ids[:1], gold=gold[:1])
