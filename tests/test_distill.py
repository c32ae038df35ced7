"""`wellread distill` end to end with real processes: rank equivalence (with a rank left example-less by the
partial last batch), kill + resume, exactly-once coverage, store checks, PD initialisation, PKD, DistilBERT.

Data: the SST-2 slice in tests/fixtures (no ../shared needed). Teachers are small random-init BERTs
saved as Hugging Face directories: distillation only needs *a* fixed teacher, and a random classifier with a
scaled-up head gives confident, varied soft labels.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_DATA, tiny_corpus
from distributed import kill_group, max_step, metrics, run, start, wait_for

N_TRANSFER = 257  # 4 global batches of 64 + 1: the last global batch has a single example


def _save_teacher(model, out: Path) -> Path:
    from trainer.data.tokenization import hf_tokenizer, load_tokenizer

    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(out)
    return out


def random_classifier(out: Path, seed: int) -> Path:
    from transformers import BertForSequenceClassification

    from trainer.models.zoo import bert_config

    torch.manual_seed(seed)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels = 2
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)  # confident, input-dependent soft labels
    return _save_teacher(model, out)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {"a": random_classifier(root / "a", 1), "b": random_classifier(root / "b", 2)}


def label_recipe(path: Path, teacher: Path, out: Path, n: int = N_TRANSFER) -> Path:
    path.write_text(f"""
teacher: {teacher}
transfer: {{task: sst2, task_split: train, max_examples: {n}, data_root: {FIXTURE_DATA}}}
output: {{out_dir: {out}, kind: classification, part_examples: 100, batch_size: 64}}
""")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, teachers) -> Path:
    root = tmp_path_factory.mktemp("store")
    run(1, "label", str(label_recipe(root / "label.yaml", teachers["a"], root / "store")))
    return root / "store"


def distill_recipe(path: Path, store: Path, **extra) -> Path:
    path.write_text(f"""
data: {{store: {store}, eval_task: sst2, data_root: {FIXTURE_DATA}, verify: size}}
model: {{name: bert-L2-H128, dropout: 0.0}}
train: {{epochs: 2, micro_batch: 32, global_batch: 64, lr: 2.0e-3, warmup_steps: 1, seed: 7}}
engine: {{ds_config: zero2}}
run: {{log_every: 1, ckpt_every: 3, tensorboard: false}}
""")
    return path


def distill(nproc: int, recipe: Path, out: Path, *overrides: str, **kw):
    return run(nproc, "distill", str(recipe), f"run.out_dir={out}", *overrides, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ref")
    recipe = distill_recipe(root / "kd.yaml", store)
    runs = {"1rank": root / "1rank", "2ranks": root / "2ranks", "recipe": recipe}
    distill(1, recipe, runs["1rank"], "debug.record_examples=true")
    distill(2, recipe, runs["2ranks"], "debug.record_examples=true")
    return runs


def global_batches(out: Path, ranks: int) -> list[tuple[int, list[int]]]:
    """(epoch, example ids) of every optimizer step, from what each rank recorded training on
    (debug.record_examples: one line per micro-batch; 64 per step = 2 micro-batches x 1 rank or 1 x 2 ranks)."""
    lines = [
        [json.loads(line) for line in (out / f"debug-examples-rank{r}.jsonl").read_text().splitlines()]
        for r in range(ranks)
    ]
    per_step = 2 // ranks  # micro-batches per rank and step
    assert len({len(rank) for rank in lines}) == 1, "ranks ran different numbers of micro-batches"
    steps = []
    for k in range(0, len(lines[0]), per_step):
        micro = [rank[j] for rank in lines for j in range(k, k + per_step)]
        assert len({m["epoch"] for m in micro}) == 1
        steps.append((micro[0]["epoch"], sorted(i for m in micro for i in m["ids"])))
    return steps


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_every_example_is_seen_once_per_epoch(reference, store):
    from trainer.data.softlabels import SoftLabelStore

    one, two = metrics(reference["1rank"]), metrics(reference["2ranks"])
    steps_per_epoch = math.ceil(N_TRANSFER / 64)
    assert sorted(one) == list(range(1, 2 * steps_per_epoch + 1)) == sorted(two)
    for s in one:  # gloo sums in another order than one rank's accumulation: float32 rounding only
        assert math.isfinite(one[s]) and one[s] == pytest.approx(two[s], rel=1e-5, abs=1e-7), (s, one[s], two[s])
    # The example ids each rank trained on (a rank's zero-weight filler, in the last step of 2 ranks, is none):
    # every example of the store exactly once per epoch, and the same global batches for 1 and 2 ranks.
    ids = sorted(int(i) for i in SoftLabelStore(store).example_ids())
    assert len(ids) == len(set(ids)) == N_TRANSFER
    batches = {ranks: global_batches(reference[run], ranks) for ranks, run in ((1, "1rank"), (2, "2ranks"))}
    assert batches[1] == batches[2]
    assert [epoch for epoch, _ in batches[1]] == [0] * steps_per_epoch + [1] * steps_per_epoch
    for epoch in (0, 1):
        seen = collections.Counter(i for e, step in batches[1] if e == epoch for i in step)
        assert sorted(seen) == ids and set(seen.values()) == {1}, (epoch, seen.most_common(3))
    assert batches[1][:steps_per_epoch] != batches[1][steps_per_epoch:]  # a new order each epoch
    for out in (reference["1rank"], reference["2ranks"]):
        seen = metrics(out, "train/examples_seen")
        assert seen[steps_per_epoch] == N_TRANSFER and seen[2 * steps_per_epoch] == 2 * N_TRANSFER
        kd = metrics(out, "train/kd")
        assert kd[2 * steps_per_epoch] < kd[1]  # the student moves towards the teacher


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference):
    out = tmp_path / "killed"
    args = ("distill", str(reference["recipe"]), f"run.out_dir={out}", "debug.step_sleep=1.0")
    proc = start(2, *args, log=tmp_path / "k.log")
    wait_for(
        lambda: (out / "checkpoints" / "latest.json").is_file() and max_step(out) >= 4,
        proc=proc,
        log=tmp_path / "k.log",
    )
    kill_group(proc)
    resumed = distill(2, reference["recipe"], out)
    assert "resumed from" in resumed.stderr
    a, b = metrics(reference["2ranks"]), metrics(out)
    assert sorted(a) == sorted(b)
    # CPU fp32 ZeRO-2: the resumed run replays the same arithmetic (tests/test_pretrain.py asserts the same)
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


@pytest.mark.slow
def test_the_run_records_the_store_it_learned_from(reference, store, teachers):
    source = json.loads((reference["1rank"] / "distill-source.json").read_text())
    manifest = json.loads((store / "manifest.json").read_text())
    assert source["store"]["teacher"] == manifest["header"]["teacher"]
    assert source["transfer_fingerprint"] == manifest["header"]["transfer_fingerprint"]
    info = json.loads((reference["1rank"] / "export" / "wellread.json").read_text())
    assert info["stage"] == "distill" and info["source"]["store"]["path"] == str(store)
    assert "accuracy" in info["metrics"]


def test_a_store_for_another_transfer_set_or_teacher_is_refused(tmp_path, store, teachers):
    recipe = distill_recipe(tmp_path / "r.yaml", store)
    other_transfer = f"data.transfer={{task: sst2, task_split: train, max_examples: 100, data_root: {FIXTURE_DATA}}}"
    proc = distill(1, recipe, tmp_path / "o1", other_transfer, expect=2)
    assert "other transfer data" in proc.stderr and len(proc.stderr.strip().splitlines()[-1]) < 400
    proc = distill(1, recipe, tmp_path / "o2", f"teacher.model={teachers['b']}", expect=2)
    assert "not the teacher that labeled" in proc.stderr


def test_a_store_made_with_another_tokenizer_is_refused(tmp_path, store):
    """The student's tokenizer (here a word-level vocabulary of its own) must be the one the store was made with."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from trainer.models.zoo import bert_config

    student = tmp_path / "student"
    student.mkdir()
    tok = Tokenizer(
        models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "a": 5}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(student / "tokenizer.json"))
    from transformers import BertForSequenceClassification

    cfg = bert_config("bert-L2-H128", vocab_size=6)
    BertForSequenceClassification(cfg).save_pretrained(student, safe_serialization=True)
    proc = distill(1, distill_recipe(tmp_path / "r.yaml", store), tmp_path / "o", f"model.name={student}", expect=2)
    assert "another tokenizer" in proc.stderr


@pytest.mark.slow
def test_pd_starts_from_the_pretrained_student(tmp_path, store):
    """Pre-trained Distillation loads the MLM run's encoder: with lr 0 the export's encoder is the run's, bit
    for bit (the classification head is new)."""
    from safetensors.torch import load_file

    pretrained = tmp_path / "pt"
    from transformers import BertForMaskedLM

    from trainer.models.zoo import bert_config

    torch.manual_seed(5)
    _save_teacher(BertForMaskedLM(bert_config("bert-L2-H128")), pretrained)
    out = tmp_path / "pd"
    distill(
        1,
        distill_recipe(tmp_path / "r.yaml", store),
        out,
        f"model.name={pretrained}",
        "train.lr=0",
        "train.epochs=null",
        "train.steps=2",
        "data.eval_task=null",
    )
    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "export" / "model.safetensors")
    encoder = [k for k in after if k.startswith("bert.encoder.") or k.startswith("bert.embeddings.")]
    assert len(encoder) > 20
    for k in encoder:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.slow
def test_patient_kd_with_an_online_teacher(tmp_path, store, teachers):
    """PKD-Skip from a 2-layer teacher to a 2-layer student maps student layer 1 to teacher layer 1."""
    out = tmp_path / "pkd"
    distill(
        1,
        distill_recipe(tmp_path / "r.yaml", store),
        out,
        f"teacher.model={teachers['a']}",
        "loss.beta=10",
        "loss.alpha=0.7",
        "train.epochs=null",
        "train.steps=3",
        "data.eval_task=null",
    )
    pkd = metrics(out, "train/pkd")
    assert len(pkd) == 3 and all(v > 0 for v in pkd.values())
    source = json.loads((out / "distill-source.json").read_text())
    assert source["pkd_map"] == [[1, 1]]


@pytest.mark.slow
def test_patient_kd_from_stored_cls_states_needs_no_teacher(tmp_path, store, teachers):
    """A store labeled with output.cls_layers runs PKD with no teacher at training time, and matches the online
    teacher's run: the same KD term (both read the store's logits) and a PKD term that differs only by the fp16
    rounding of the stored [CLS] vectors (relative 2^-11 per element; far below 1e-2 after three steps)."""
    rich = tmp_path / "store-cls"
    recipe = label_recipe(tmp_path / "label.yaml", teachers["a"], rich)
    run(1, "label", str(recipe), "output.cls_layers=[1,2]")
    common = ("loss.beta=10", "loss.alpha=0.7", "train.epochs=null", "train.steps=3", "data.eval_task=null")
    offline, online = tmp_path / "offline", tmp_path / "online"
    distill(1, distill_recipe(tmp_path / "r.yaml", rich), offline, *common)
    distill(1, distill_recipe(tmp_path / "r.yaml", rich), online, f"teacher.model={teachers['a']}", *common)
    source = json.loads((offline / "distill-source.json").read_text())
    assert source["pkd_map"] == [[1, 1]] and source["pkd_teacher_states"] == "store"
    assert "online_teacher" not in source
    # Step 1 runs the same student weights on the same batch against the same stored logits on both sides: the
    # KD term is the same computation, bit for bit (only the PKD term sees the fp16 [CLS] rounding).  Later steps
    # inherit that rounding through the first update, hence the tolerances after it.
    assert metrics(offline, "train/kd")[1] == metrics(online, "train/kd")[1]
    for term, tol in (("train/kd", 1e-4), ("train/pkd", 1e-2)):
        a, b = metrics(offline, term), metrics(online, term)
        assert len(a) == 3 and a.keys() == b.keys()
        assert all(math.isclose(a[k], b[k], rel_tol=tol) for k in a), (term, a, b)
    assert metrics(offline, "train/pkd")[1] > 0
    # the map needs teacher layer 1; a store holding only layer 2 is refused in one line
    only2 = tmp_path / "store-l2"
    run(1, "label", str(label_recipe(tmp_path / "l2.yaml", teachers["a"], only2)), "output.cls_layers=[2]")
    bad = distill(1, distill_recipe(tmp_path / "r.yaml", only2), tmp_path / "bad", *common, expect=2)
    assert bad.returncode == 2 and "holds layers [2]" in bad.stderr and "output.cls_layers=[1]" in bad.stderr


# ---------------------------------------------------------------------------------------------- DistilBERT
@pytest.fixture(scope="module")
def mlm_setup(tmp_path_factory) -> dict[str, Path]:
    """A random MLM teacher (2 x 128), a 1-layer student copied from its layer 0, the demo book as shards."""
    from transformers import BertForMaskedLM

    from trainer.models.zoo import bert_config

    root = tmp_path_factory.mktemp("mlm")
    torch.manual_seed(4)
    teacher = _save_teacher(BertForMaskedLM(bert_config("bert-L2-H128")), root / "teacher")
    run(1, "init-student", "--teacher", str(teacher), "--layers", "0", "--out", str(root / "student"))
    tiny_corpus(root / "corpus")
    recipe = root / "distilbert.yaml"
    recipe.write_text(f"""
data: {{corpus: {root / "corpus"}, eval_corpus: {root / "corpus"}, eval_max_sequences: 32, verify: size}}
teacher: {{model: {teacher}}}
model: {{name: {root / "student"}, dropout: 0.0}}
train: {{epochs: null, steps: 3, micro_batch: 8, global_batch: 16, lr: 1.0e-3, warmup_steps: 1, seed: 5}}
engine: {{ds_config: zero2}}
run: {{log_every: 1, tensorboard: false}}
""")
    return {"root": root, "teacher": teacher, "student": root / "student", "recipe": recipe}


@pytest.mark.slow
def test_distilbert_triple_loss_online(mlm_setup):
    from transformers import BertForMaskedLM

    out = mlm_setup["root"] / "online"
    run(1, "distill", str(mlm_setup["recipe"]), f"run.out_dir={out}")
    for term in ("kd", "mlm", "cos"):
        values = metrics(out, f"train/{term}")
        assert sorted(values) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in values.values()), term
    assert metrics(out, "eval/mlm_acc")
    assert BertForMaskedLM.from_pretrained(out / "export").config.num_hidden_layers == 1


@pytest.mark.slow
def test_distilbert_offline_from_a_topk_store(mlm_setup, tmp_path):
    from conftest import DEMO_BOOKS

    label = tmp_path / "label.yaml"
    label.write_text(f"""
teacher: {mlm_setup["teacher"]}
transfer: {{files: [{DEMO_BOOKS[0]}], doc_mode: line, min_chars: 40, max_examples: 64}}
output: {{out_dir: {tmp_path / "store"}, kind: mlm, topk: 8, mask_prob: 0.15, max_seq_len: 32, batch_size: 32}}
""")
    run(1, "label", str(label))
    out = tmp_path / "offline"
    proc = run(
        1,
        "distill",
        str(mlm_setup["recipe"]),
        f"run.out_dir={out}",
        f"data.store={tmp_path / 'store'}",
        "data.corpus=null",
        "teacher.model=null",
        "loss.a_mlm=0",
        "loss.a_cos=0",
        expect=None,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kd = metrics(out, "train/kd")
    assert sorted(kd) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in kd.values())
    refused = run(
        1,
        "distill",
        str(mlm_setup["recipe"]),
        f"run.out_dir={tmp_path / 'x'}",
        f"data.store={tmp_path / 'store'}",
        "data.corpus=null",
        "teacher.model=null",
        expect=2,
    )
    assert "MLM and cosine terms need data.corpus" in refused.stderr


def test_cosine_term_refuses_a_width_mismatch_without_projection(mlm_setup, tmp_path):
    proc = run(
        1, "distill", str(mlm_setup["recipe"]), f"run.out_dir={tmp_path / 'w'}", "model.name=bert-L2-H256", expect=2
    )
    assert "loss.projection=true" in proc.stderr
