"""`wellread distill RECIPE.yaml [key=value ...]`: a student learns from a teacher's soft labels.

One stage, three papers, chosen by the recipe:
- Pre-trained Distillation (Turc et al.): `model.name` is an MLM pre-training run, export or checkpoint;
  `data.store` a classification soft-label store (`wellread label`). Loss = alpha T^2 KL + (1 - alpha) CE.
  The same command from a preset (random init) is the KD baseline.
- Patient KD (Sun et al.): add `loss.beta > 0`; the teacher's [CLS] states of the mapped layers
  (`loss.pkd_scheme: skip | last`) come from an online `teacher.model`, or from a store labeled with
  `output.cls_layers` (then no teacher runs at all).
- DistilBERT (Sanh et al.): `data.corpus` token shards and an online MLM `teacher.model` (or an MLM
  top-k `data.store`); loss = a_ce T^2 KL + a_mlm MLM + a_cos cosine; start from `wellread init-student`.

What is special about it: batches are store indices (every example exactly once per epoch for any rank
count, length-bucketed so short sentences do not pay for long ones, the last global batch partial, a rank
with none runs a zero-weight filler); the store's teacher,
tokenizer and transfer-set fingerprints are checked, then recorded in OUT/distill-source.json and the
export; the teacher runs on the data side under no_grad, so the engine holds the student alone.

The code: `DistillStage` holds what both kinds share (the store, the tokenizer checks, the online teacher
(trainer/models/teacher.py, the one `wellread label` uses), the record, the batch split, the export);
`ClassifierDistill` (KD / PD / PKD) and `MLMDistill` (DistilBERT) add their data, module, order, batches,
count and evaluation. `distill_stage` picks one from the recipe: the store's kind, else data.corpus (MLM).

Normalisation: every term is summed over its rows and the sum divided by one global count per step:
examples (classification) or KD positions (MLM; = masked positions with `kd_positions: masked`). The
cosine term of the MLM mode is summed over all non-pad positions, so relative to DistilBERT's per-position
mean it weighs (non-pad / KD positions), about 1 / mask_prob: divide a paper's a_cos by that ratio.
See trainer/models/distillation.py for the conventions of each term and how to translate the papers'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import from_dict
from trainer.data.encoding import Encoded, collate, encode, load_task_data
from trainer.data.indexed import TokenShards
from trainer.data.masking import MaskSpec, mlm_batch
from trainer.data.sampling import BatchOrder, StoreSampler, SubsetOrder, nested_subset
from trainer.data.softlabels import SoftLabelStore
from trainer.data.task_metrics import compute_metrics
from trainer.data.tasks import Example, resolve_task
from trainer.data.tokenization import hf_tokenizer, load_tokenizer, special_ids, tokenizer_hash
from trainer.data.transfer import (
    PLURAL,
    TransferSection,
    transfer_examples,
    transfer_fingerprint,
    transfer_inputs,
)
from trainer.engine import load_ds_config, precision
from trainer.errors import UserError
from trainer.fileio import atomic_write_json
from trainer.health import prediction_spread
from trainer.launcher import DistEnv
from trainer.loop import Stage, Trainer, run_stage
from trainer.models.distillation import HiddenProjection, pkd_layer_map
from trainer.models.teacher import Teacher, teacher_dir
from trainer.models.zoo import resolve
from trainer.preflight import distill_fit
from trainer.recipes.distill import DistillRecipe
from trainer.registry import add_recipe_arguments


class DistillStage(Stage):
    """What every kind of distillation shares; a subclass per kind builds its module and batches."""

    name = "distill"
    kind: str
    default_temperature: float
    max_len: int

    def __init__(self, recipe: DistillRecipe, store: SoftLabelStore | None = None):
        self.recipe = recipe
        self.store = store  # the offline teacher, opened (and verified) by distill_stage
        self.teacher: Teacher | None = None  # the online one
        self.source: dict[str, Any] = {}  # OUT/distill-source.json and the export's record
        self.t = recipe.loss.temperature or self.default_temperature

    # -- building
    def prepare(self, env: DistEnv, where: str) -> None:
        """The fit of student, teacher and store (from their configs), the tokenizer checks and the frozen online
        teacher (never partitioned: it is not trained)."""
        distill_fit(self.recipe, where)
        self.rank = env.rank
        self.tokenizer = self._student_tokenizer()
        if self.recipe.teacher.model:
            self.teacher = self._load_teacher()

    def build(self, env: DistEnv, where: str) -> torch.nn.Module:
        module = self.build_distiller(where)
        if env.is_main:
            Path(self.recipe.run.out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(self.recipe.run.out_dir) / "distill-source.json", self.source)
        return module

    def build_distiller(self, where: str) -> torch.nn.Module:
        raise NotImplementedError

    def _student_tokenizer(self):
        spec = resolve(self.recipe.model.name)
        tok = (
            load_tokenizer(spec / "tokenizer.json")
            if isinstance(spec, Path) and (spec / "tokenizer.json").is_file()
            else load_tokenizer()
        )
        if self.store is not None:
            # check_compatible (tokenizer, transfer set, files present) happens once the transfer set is known
            self.source["store"] = {
                "path": str(self.store.directory),
                "kind": self.store.kind,
                "examples": len(self.store),
                "teacher": self.store.header.get("teacher"),
                "tokenizer_hash": self.store.header.get("tokenizer_hash"),
                "transfer_fingerprint": self.store.header.get("transfer_fingerprint"),
            }
        self.source["student_init"] = self.recipe.model.name
        self.source["tokenizer_hash"] = tokenizer_hash(tok)
        return tok

    def _load_teacher(self) -> Teacher:
        """The online teacher in the engine's precision, checked against the student's tokenizer and the store's
        teacher."""
        spec = teacher_dir(self.recipe.teacher.model, "teacher.model")
        teacher = Teacher(spec, self.kind, precision=precision(load_ds_config(self.recipe.engine.ds_config)[0]))
        if tokenizer_hash(teacher.tokenizer()) != self.source["tokenizer_hash"]:
            raise UserError(f"teacher.model: {spec} uses another tokenizer than the student '{self.recipe.model.name}'")
        if self.store is not None:
            theirs = (self.store.header.get("teacher") or {}).get("weights_sha256")
            if theirs != teacher.weights_sha256():
                raise UserError(
                    f"teacher.model: {spec} is not the teacher that labeled {self.store.directory} "
                    f"(weights sha256 {str(theirs)[:12]}..); re-label, or drop teacher.model"
                )
        self.source["online_teacher"] = str(spec)
        return teacher

    # -- each step
    def micro_batches(self, items: np.ndarray, epoch: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        return [self.batch(chunk, epoch) for chunk in np.array_split(items, accumulation)]

    def batch(self, chunk: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def record_examples(self, ids: np.ndarray, epoch: int) -> None:
        """debug.record_examples: append the example ids this rank trains on (one micro-batch) to its own file."""
        path = Path(self.recipe.run.out_dir) / f"debug-examples-rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "ids": [int(i) for i in ids]}) + "\n")

    @staticmethod
    def _filler(chunk: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """A rank left without examples still runs a forward (zero weight) so ranks stay in step."""
        if len(chunk):
            return chunk, torch.ones(len(chunk))
        return np.zeros(1, dtype=np.int64), torch.zeros(1)

    def step_scalars(self, sums: dict[str, float], count: float) -> dict[str, float]:
        out = {name: sums[name] / count for name in ("kd", "ce", "gold_mse", "pkd", "mlm", "cos") if name in sums}
        if "agree" in sums:
            out["teacher_agreement"] = sums["agree"] / count
        if sums.get("labeled"):
            out["gold_acc"] = sums["correct"] / sums["labeled"]
        if sums.get("masked"):
            out["mlm_acc"] = sums["correct"] / sums["masked"]
        return out

    # -- output
    def hf_tokenizer(self):
        return hf_tokenizer(self.tokenizer, min(self.max_len, 512))

    def export_info(self, trainer: Trainer, final_metrics: dict[str, float] | None) -> dict:
        return {
            "stage": self.name,
            "step": trainer.state.step,
            "kind": self.kind,
            "temperature": self.t,
            "metrics": final_metrics,
            "source": self.source,
            "labels": getattr(getattr(self, "task", None), "labels", None),
            "inputs": getattr(self, "inputs", None),  # classification: "single" or "pair" (a teacher's arity check)
        }


class ClassifierDistill(DistillStage):
    """Sequence classification (Turc et al. KD / PD, Patient KD): batches are transfer examples, their teacher
    logits (and PKD's [CLS] states) from the store or the online teacher."""

    kind = "classification"
    default_temperature = 1.0

    @property
    def eval_prefix(self) -> str:
        return f"eval_{self.recipe.data.eval_split}"

    def _transfer(self, where: str) -> tuple[TransferSection, list[Example]]:
        """The transfer set: the recipe's, else the one the store was labeled on; checked against the store, and its
        arity (single texts or pairs) against the store's, the online teacher's and the evaluation task's."""
        t = self.recipe.data.transfer
        if t is None and self.store is not None:
            t = from_dict(
                TransferSection, self.store.header["config"]["transfer"], f"{self.store.directory}/manifest.json"
            )
        if t is None:
            raise UserError(f"{where}: data.transfer is required with an online teacher and no store")
        fingerprint = transfer_fingerprint(t)
        if self.store is not None:
            self.store.check_compatible(self.source["tokenizer_hash"], fingerprint, where)
        self.inputs = self._check_inputs(transfer_inputs(t), where)
        examples = list(transfer_examples(t))
        if self.store is not None and len(examples) != len(self.store):
            raise UserError(
                f"{where}: the transfer set has {len(examples)} examples, the store "
                f"{self.store.directory} {len(self.store)}"
            )
        self.source["transfer_fingerprint"] = fingerprint
        self.source["inputs"] = self.inputs
        return t, examples

    def _check_inputs(self, inputs: str, where: str) -> str:
        """Single texts or pairs, the same for the transfer set, the store, the online teacher and data.eval_task:
        a student trained on pairs and scored on single sentences (or the reverse) gives a number that means nothing."""
        seen = {"the transfer set": inputs}
        if self.store is not None:
            seen[f"the store {self.store.directory}"] = self.store.inputs
        if self.teacher is not None and self.teacher.inputs is not None:
            seen[f"teacher.model {self.teacher.directory}"] = self.teacher.inputs
        if self.recipe.data.eval_task:
            task = resolve_task(self.recipe.data.eval_task)
            seen[f"data.eval_task {task.name}"] = "pair" if task.text_b is not None else "single"
        if len(set(seen.values())) > 1:
            said = ", ".join(f"{who}: {PLURAL[kind]}" for who, kind in seen.items())
            raise UserError(f"{where}: single texts and sentence pairs mixed ({said}); use one kind throughout")
        return inputs

    def build_distiller(self, where: str) -> torch.nn.Module:
        # deferred: classify and distiller import transformers' BERT modeling (~1.5 s); `distill --help` does not
        from trainer.models.classify import load_classifier
        from trainer.models.distiller import ClassifierDistiller

        data, loss, model = self.recipe.data, self.recipe.loss, self.recipe.model
        transfer, examples = self._transfer(where)
        label_cfg = self.store.header.get("config", {}).get("output", {}) if self.store is not None else {}
        self.max_len = data.max_seq_len or label_cfg.get("max_seq_len", 128)
        self.pad_id = special_ids(self.tokenizer).pad
        num_classes = self.store.num_classes if self.store is not None else self.teacher.num_classes
        self.regression = num_classes == 1  # a one-output teacher scores (STS-B): its score is the soft label
        self.encoded: Encoded = encode(examples, self.tokenizer, self.max_len, self.regression)  # fine-tuning's
        self.hf = load_classifier(
            model.name,
            num_classes,
            model.dropout,
            model.attention,
            self.tokenizer.get_vocab_size(),
            self._class_names(transfer, num_classes),
        )
        self.teacher_layers: list[int] = []  # PKD: the teacher layers whose [CLS] states the student meets, in order
        self.cls_index: list[int] | None = None  # PKD from the store: which stored [CLS] layers, in map order
        student_layers = self._patient_kd() if loss.beta > 0 else []
        self.eval_enc = None
        if data.eval_task:
            self.task = resolve_task(data.eval_task)
            self.eval_enc, _ = load_task_data(self.task, data.eval_split, data.data_root, self.tokenizer, self.max_len)
        projection = self.pkd_projection if student_layers else None  # set by _patient_kd
        return ClassifierDistiller(self.hf, self.t, loss.alpha, loss.beta, student_layers, projection)

    def _class_names(self, transfer: TransferSection, num_classes: int) -> list[str] | None:
        """What the student's export calls its classes: the teacher's own names (online, else those the store
        recorded when that teacher labeled it: the teacher that made the labels defines what each logit column
        means), else the evaluation task's or the transfer set's task's (their label ids are assumed to be the
        teacher's classes); None keeps LABEL_0, LABEL_1 ..."""
        found = [self.teacher.class_names] if self.teacher is not None else []
        found += [self.store.class_names] if self.store is not None else []
        found += [resolve_task(task).class_names for task in (self.recipe.data.eval_task, transfer.task) if task]
        return next((names for names in found if names is not None and len(names) == num_classes), None)

    def _patient_kd(self) -> list[int]:
        """The PKD layer map (student layers returned); the teacher's states come online, else from the store.
        Depths, widths and the stored layers were checked against it in prepare (preflight.distill_fit)."""
        depth = self.teacher.depth if self.teacher is not None else self.store.teacher_layers
        pairs = pkd_layer_map(depth, self.hf.config.num_hidden_layers, self.recipe.loss.pkd_scheme)
        self.teacher_layers = [t for _, t in pairs]
        if self.teacher is None:
            self.cls_index = [self.store.cls_layers.index(t) for t in self.teacher_layers]
        self.source["pkd_map"] = pairs
        self.source["pkd_teacher_states"] = "online" if self.teacher is not None else "store"
        # a narrower student (widths differ only with loss.projection): one learned map of its [CLS] states to the
        # teacher's width, shared by every mapped layer (TinyBERT's W_h; see ClassifierDistiller), dropped at export
        hs = self.hf.config.hidden_size
        ht = self.teacher.hidden_size if self.teacher is not None else self.store.manifest["hidden_size"]
        self.pkd_projection = HiddenProjection(hs, ht) if hs != ht else None
        self.source["pkd_projection"] = [hs, ht] if hs != ht else None
        return [s for s, _ in pairs]

    def make_order(self, global_batch: int, env: DistEnv) -> BatchOrder | SubsetOrder:
        # Store index i is the example with the i-th smallest id; its length is that transfer example's.
        lengths = self.encoded.lengths
        if self.store is not None:
            lengths = lengths[self.store.example_ids()]
        data = self.recipe.data
        subset = nested_subset(len(lengths), data.max_examples, data.subset_seed)
        order = StoreSampler(
            len(subset),
            global_batch,
            env.rank,
            env.world_size,
            self.recipe.train.seed,
            lengths[subset],
            data.bucket_window,
        )
        if len(subset) == len(lengths):
            return order
        self.source["transfer_subset"] = {"examples": len(subset), "of": len(lengths), "seed": data.subset_seed}
        return SubsetOrder(order, subset)

    def batch(self, chunk: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        idx, weight = self._filler(chunk)
        if self.store is not None:
            labels = self.store.batch(idx)
            rows = labels["example_ids"]
            teacher_logits, gold = torch.from_numpy(labels["logits"]), torch.from_numpy(labels["gold"])
        else:
            rows, teacher_logits, gold = idx, None, torch.from_numpy(self.encoded.labels[idx])
        if self.recipe.debug.record_examples:
            self.record_examples(np.asarray(rows)[weight.numpy() > 0], epoch)  # a filler (weight 0) trains on none
        batch = collate(self.encoded, rows, self.pad_id)
        batch.pop("labels", None)
        batch.update(weight=weight, gold=gold)
        if self.cls_index is not None:
            batch["teacher_cls"] = torch.from_numpy(labels["cls"][:, self.cls_index])
        pkd_online = self.teacher is not None and self.recipe.loss.beta > 0
        if teacher_logits is None or pkd_online:  # the online teacher runs only when it gives something
            inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
            logits, cls = self.teacher.classify(inputs, self.teacher_layers if pkd_online else ())
            teacher_logits = logits if teacher_logits is None else teacher_logits
            if cls is not None:
                batch["teacher_cls"] = cls
        batch["teacher_logits"] = teacher_logits
        return batch

    def count(self, micro: list[dict[str, torch.Tensor]]) -> float:
        return float(sum(b["weight"].sum() for b in micro))

    def evaluate(self, trainer: Trainer) -> dict[str, float] | None:
        if self.eval_enc is None:
            return None
        from trainer.models.classify import predict  # deferred: transformers' BERT modeling, as in build_distiller

        logits = predict(
            trainer.engine.module, self.eval_enc, trainer.env, self.recipe.data.eval_batch_size, self.pad_id
        )
        preds = logits[:, 0] if self.regression else logits.argmax(-1)  # scores: Pearson / Spearman
        return {
            **compute_metrics(self.task, preds, self.eval_enc.labels),
            **prediction_spread(preds, self.eval_enc.labels, self.regression),
        }


class MLMDistill(DistillStage):
    """DistilBERT: an online MLM teacher over dynamically masked token shards (KD + MLM + cosine), or the
    top-k distributions of an MLM store at its (already masked) inputs (KD alone)."""

    kind = "mlm"
    default_temperature = 2.0
    eval_prefix = "eval"

    def build_distiller(self, where: str) -> torch.nn.Module:
        # deferred: distiller and mlm import transformers' BERT modeling (~1.5 s); `distill --help` does not
        from trainer.models.distiller import MLMDistiller
        from trainer.models.mlm import build_mlm

        data, loss, model = self.recipe.data, self.recipe.loss, self.recipe.model
        vocab = self.tokenizer.get_vocab_size()
        if self.store is None:
            if not data.corpus:
                raise UserError(f"{where}: MLM distillation needs data.corpus (online teacher) or an MLM data.store")
            self.corpus = TokenShards(data.corpus, verify=data.verify)
            if self.corpus.tokenizer_hash != self.source["tokenizer_hash"]:
                raise UserError(f"{data.corpus}: tokenized with another tokenizer than the student's")
        elif loss.a_mlm > 0 or loss.a_cos > 0:
            raise UserError(
                f"{where}: an offline MLM store holds the teacher's top-k at its (already masked) inputs; "
                "the MLM and cosine terms need data.corpus and teacher.model (set loss.a_mlm=0 "
                "loss.a_cos=0 to distil from the store alone)"
            )
        else:
            self.store.check_compatible(self.source["tokenizer_hash"], None, where)
        self.spec = MaskSpec(vocab_size=vocab, specials=special_ids(self.tokenizer), mask_prob=data.mask_prob)
        self.special = self.spec.special_table()
        self.max_len = data.max_seq_len or 512
        self.hf = build_mlm(model.name, vocab, model.dropout, model.max_position, model.attention)
        projection = None
        if loss.a_cos > 0:
            if self.teacher is None:
                raise UserError(f"{where}: loss.a_cos > 0 needs teacher.model (the teacher's hidden states)")
            hs, ht = self.hf.config.hidden_size, self.teacher.hidden_size  # equal unless loss.projection (prepare)
            projection = HiddenProjection(hs, ht) if hs != ht else None
        self.eval_corpus = TokenShards(data.eval_corpus, verify=data.verify) if data.eval_corpus else None
        return MLMDistiller(
            self.hf, self.t, loss.a_ce, loss.a_mlm if self.store is None else 0.0, loss.a_cos, projection
        )

    def make_order(self, global_batch: int, env: DistEnv) -> BatchOrder:
        seed = self.recipe.train.seed
        if self.recipe.data.max_examples is not None:
            raise UserError("data.max_examples: a transfer subset is for classification distillation, not MLM mode")
        if self.store is not None:
            return StoreSampler(len(self.store), global_batch, env.rank, env.world_size, seed)
        return BatchOrder(
            len(self.corpus), global_batch, env.rank, env.world_size, seed, what=str(self.corpus.directory)
        )

    def batch(self, chunk: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        idx, weight = self._filler(chunk)
        return self._store_batch(idx, weight) if self.store is not None else self._online_batch(idx, weight, epoch)

    def _store_batch(self, idx: np.ndarray, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored inputs and top-k at every non-pad position (the KD positions)."""
        got = self.store.batch(idx)
        mask = torch.from_numpy(got["attention_mask"])
        flat = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        k = got["topk_ids"].shape[-1]
        return {
            "input_ids": torch.from_numpy(got["input_ids"]),
            "attention_mask": mask,
            "weight": weight,
            "kd_positions": flat,
            "topk_ids": torch.from_numpy(got["topk_ids"]).reshape(-1, k).index_select(0, flat),
            "topk_logprobs": torch.from_numpy(got["topk_logprobs"]).reshape(-1, k).index_select(0, flat),
        }

    def _online_batch(self, idx: np.ndarray, weight: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Corpus sequences masked for (seed, epoch, index), the teacher's logits at the KD positions."""
        seed, loss = self.recipe.train.seed, self.recipe.loss
        batch = mlm_batch(
            [self.corpus[int(i)] for i in idx], [(seed, epoch, int(i)) for i in idx], self.spec, self.special
        )
        mask = batch["attention_mask"]
        if loss.kd_positions == "masked":
            batch["kd_positions"] = batch["mlm_positions"]
        else:
            batch["kd_positions"] = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        logits, hidden = self.teacher.mlm(
            {"input_ids": batch["input_ids"], "attention_mask": mask}, hidden=loss.a_cos > 0
        )
        batch["teacher_logits"] = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["kd_positions"])
        if hidden is not None:
            batch["teacher_hidden"] = hidden
        batch["weight"] = weight
        return batch

    def count(self, micro: list[dict[str, torch.Tensor]]) -> float:
        return float(
            sum(
                (
                    b["weight"].repeat_interleave(b["attention_mask"].shape[1]).index_select(0, b["kd_positions"]) > 0
                ).sum()
                for b in micro
            )
        )

    def evaluate(self, trainer: Trainer) -> dict[str, float] | None:
        if self.eval_corpus is None:
            return None
        from trainer.models.mlm import evaluate_mlm  # deferred: transformers' BERT modeling, as in build_distiller

        batch, most = self.recipe.train.micro_batch, self.recipe.data.eval_max_sequences
        return evaluate_mlm(trainer.engine, self.eval_corpus, self.spec, trainer.env, batch, most, 1234, mask_prob=0.15)


STAGES: dict[str, type[DistillStage]] = {"classification": ClassifierDistill, "mlm": MLMDistill}


def distill_stage(recipe: DistillRecipe) -> DistillStage:
    """The stage for the recipe's kind: the store's (opened and verified here), else MLM with data.corpus."""
    data = recipe.data
    store = SoftLabelStore(data.store, verify=data.verify) if data.store else None
    kind = store.kind if store is not None else ("mlm" if data.corpus else "classification")
    return STAGES[kind](recipe, store)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def main(args: argparse.Namespace) -> int:
    return run_stage(DistillRecipe, distill_stage, args.recipe, args.overrides)
