"""`wellread pretrain RECIPE.yaml [key=value ...]`: MLM pre-training of a student or teacher on DeepSpeed.

What is special about it: batches come from memory-mapped token shards with dynamic masking keyed by
(seed, epoch, example), so any rank count sees the same masks; the loss is the sparse MLM loss over the
masked positions of the global batch; evaluation is masked-token loss/accuracy on held-out shards.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from trainer.data.indexed import TokenShards
from trainer.data.masking import MaskSpec, mlm_batch
from trainer.data.sampling import BatchOrder
from trainer.data.tokenization import hf_tokenizer, special_ids
from trainer.engine import precision
from trainer.errors import UserError
from trainer.launcher import DistEnv
from trainer.loop import Stage, Trainer, run_stage
from trainer.models.mlm import SparseMLM, build_mlm, evaluate_mlm
from trainer.recipes.pretrain import PretrainRecipe
from trainer.registry import add_recipe_arguments
from trainer.runlog import peak_flops, transformer_flops


class Pretrain(Stage):
    name = "pretrain"

    def __init__(self, recipe: PretrainRecipe):
        self.recipe = recipe
        self.flops = 0.0

    def build(self, env: DistEnv, where: str) -> torch.nn.Module:
        data, model = self.recipe.data, self.recipe.model
        self.corpus = TokenShards(data.train, verify=data.verify)
        self.eval_corpus = TokenShards(data.eval, verify=data.verify) if data.eval else None
        self.tokenizer = self.corpus.tokenizer()
        if self.eval_corpus is not None and self.eval_corpus.tokenizer_hash != self.corpus.tokenizer_hash:
            raise UserError(f"{data.eval}: made with another tokenizer than {data.train}")
        vocab = self.corpus.manifest["tokenizer"]["vocab_size"]
        self.spec = MaskSpec(vocab_size=vocab, specials=special_ids(self.tokenizer), mask_prob=data.mask_prob)
        self.special = self.spec.special_table()
        self.hf = build_mlm(model.name, vocab, model.dropout, model.max_position, model.attention)
        if self.hf.config.vocab_size != vocab:
            raise UserError(
                f"{where}: model '{model.name}' has vocab {self.hf.config.vocab_size}, the corpus "
                f"{data.train} has {vocab}"
            )
        return SparseMLM(self.hf)

    def make_order(self, global_batch: int, env: DistEnv) -> BatchOrder:
        return BatchOrder(
            len(self.corpus),
            global_batch,
            env.rank,
            env.world_size,
            self.recipe.train.seed,
            what=str(self.corpus.directory),
        )

    def micro_batches(self, items: np.ndarray, epoch: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        seed = self.recipe.train.seed
        return [
            mlm_batch([self.corpus[i] for i in chunk], [(seed, epoch, int(i)) for i in chunk], self.spec, self.special)
            for chunk in items.reshape(accumulation, -1)
        ]

    def count(self, micro: list[dict[str, torch.Tensor]]) -> float:
        return float(sum(b["mlm_labels"].numel() for b in micro))

    def step_scalars(self, sums: dict[str, float], count: float) -> dict[str, float]:
        self.flops += transformer_flops(self.hf.config, int(sums["tokens"]), self.corpus.seq_len, int(count))
        return {"mlm_acc": sums["correct"] / count}

    def rate_scalars(self, trainer: Trainer, dt: float) -> dict[str, float]:
        peak = peak_flops(trainer.engine.device, precision(trainer.ds_cfg), self.recipe.run.peak_tflops)
        mfu, self.flops = self.flops / dt / (peak * trainer.env.world_size), 0.0
        return {"mfu": mfu}

    def evaluate(self, trainer: Trainer) -> dict[str, float] | None:
        if self.eval_corpus is None:
            return None
        data, batch = self.recipe.data, self.recipe.train.micro_batch
        args = (self.eval_corpus, self.spec, trainer.env, batch, data.eval_max_sequences, data.eval_seed)
        return evaluate_mlm(trainer.engine, *args, mask_prob=data.eval_mask_prob)

    def hf_tokenizer(self):
        return hf_tokenizer(self.tokenizer, self.corpus.seq_len)

    def export_info(self, trainer: Trainer, final_metrics: dict[str, float] | None) -> dict:
        return {
            "stage": self.name,
            "step": trainer.state.step,
            "tokens_seen": trainer.state.tokens_seen,
            "corpus": str(self.corpus.directory),
            "tokenizer_sha256": self.corpus.tokenizer_hash,
        }


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def main(args: argparse.Namespace) -> int:
    return run_stage(PretrainRecipe, Pretrain, args.recipe, args.overrides)
