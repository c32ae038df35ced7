"""`wellread pretrain RECIPE.yaml [key=value ...]`: MLM pre-training of a student or teacher on DeepSpeed.

The loop: per optimizer step, every rank builds its micro-batches from the deterministic batch order,
the ranks agree on the masked-token count and on stop requests (one small all-reduce), and each
micro-batch's summed loss is scaled so the gradient is that of the mean over all masked tokens of
the global batch, whatever the number of ranks or accumulation steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from trainer import checkpoint, preemption
from trainer.cli import add_recipe_arguments
from trainer.config import dump_yaml, save_config
from trainer.data.indexed import TokenShards
from trainer.data.masking import MaskSpec, mlm_batch
from trainer.data.sampling import BatchOrder
from trainer.data.tokenization import hf_tokenizer, special_ids
from trainer.engine import initialize, precision
from trainer.errors import TrainingStopped, UserError
from trainer.launcher import DistEnv
from trainer.loop import RunState, agree, every, log0, optimizer_step, run_stage, stop_reason
from trainer.models.mlm import SparseMLM, build_mlm
from trainer.recipe import DebugSection, EngineSection, ModelSection, RunSection, TrainSection
from trainer.runlog import RunLogger, memory_mb, peak_flops, transformer_flops
from trainer.stages.evaluate_mlm import evaluate_mlm


@dataclass
class PretrainData:
    train: str = ""  # directory made by tools/preprocess_corpus.py
    eval: str | None = None  # held-out shard directory (e.g. WikiText-2 valid)
    eval_max_sequences: int | None = 2000
    eval_seed: int = 1234  # fixed evaluation masks
    eval_mask_prob: float = 0.15  # evaluation masks stay BERT's 15% whatever the training rate
    mask_prob: float = 0.15
    verify: Literal["full", "size"] = "full"  # sha256 of every shard at start, or sizes only

    def validate(self) -> None:
        if not self.train:
            raise ValueError("missing required key 'data.train' (a preprocessed shard directory)")
        for key in ("mask_prob", "eval_mask_prob"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be in (0, 1), got {getattr(self, key)}")


@dataclass
class PretrainRecipe:
    data: PretrainData = field(default_factory=PretrainData)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    engine: EngineSection = field(default_factory=EngineSection)
    run: RunSection = field(default_factory=RunSection)
    debug: DebugSection = field(default_factory=DebugSection)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def main(args: argparse.Namespace) -> int:
    return run_stage(PretrainRecipe, pretrain, args.recipe, args.overrides)


def pretrain(recipe: PretrainRecipe, env: DistEnv, where: str = "recipe") -> int:
    from trainer.kernels_config import configure_kernels

    configure_kernels(recipe.engine)
    out = Path(recipe.run.out_dir)
    corpus = TokenShards(recipe.data.train, verify=recipe.data.verify)
    eval_corpus = TokenShards(recipe.data.eval, verify=recipe.data.verify) if recipe.data.eval else None
    tok = corpus.tokenizer()
    if eval_corpus is not None and eval_corpus.tokenizer_hash != corpus.tokenizer_hash:
        raise UserError(f"{recipe.data.eval}: made with another tokenizer than {recipe.data.train}")
    vocab = corpus.manifest["tokenizer"]["vocab_size"]
    spec = MaskSpec(vocab_size=vocab, specials=special_ids(tok), mask_prob=recipe.data.mask_prob)
    special = spec.special_table()
    eval_spec = dataclasses.replace(spec, mask_prob=recipe.data.eval_mask_prob)

    torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
    hf = build_mlm(recipe.model.name, vocab, recipe.model.dropout, recipe.model.max_position, recipe.model.attention)
    if hf.config.vocab_size != vocab:
        raise UserError(f"{where}: model '{recipe.model.name}' has vocab {hf.config.vocab_size}, the corpus "
                        f"{recipe.data.train} has {vocab}")
    engine, ds_cfg, plan = initialize(SparseMLM(hf), recipe.train, recipe.engine.ds_config, env.world_size, where)
    torch.manual_seed(recipe.train.seed * 1000 + env.rank)  # per-rank dropout streams
    order = BatchOrder(len(corpus), plan.global_batch, env.rank, env.world_size, recipe.train.seed,
                       what=str(corpus.directory))

    ckpt_root = out / "checkpoints"
    state = RunState.resume(engine, ckpt_root, env) if recipe.run.resume == "auto" else None
    if state is not None:
        log0(env, f"resumed from {ckpt_root / checkpoint.tag_for(state.step)} at step {state.step} "
                  f"(epoch {state.cursor.epoch}, batch {state.cursor.batch})")
    state = state or RunState()
    log0(env, f"{env.world_size} rank(s) via {env.launcher}, ZeRO stage {engine.zero_optimization_stage()}, "
              f"micro batch {plan.micro_batch} x accumulation {plan.accumulation} x ranks = {plan.global_batch}")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(recipe, out / "config.yaml")
    logger = RunLogger(out, env.is_main, recipe.train.steps, state.step, recipe.run.tensorboard, recipe.run.log_every)
    logger.text("config", dump_yaml(recipe))
    preemption.install()

    def save() -> None:
        path = state.save(engine, ckpt_root, env, recipe.run.keep_checkpoints, recipe.debug.checkpoint_sleep,
                          {"config.json": hf.config.to_json_string(), "tokenizer.json": tok.to_str()})
        log0(env, f"checkpoint saved: {path}")

    def run_eval() -> None:
        if eval_corpus is not None:
            metrics = evaluate_mlm(engine, eval_corpus, eval_spec, env, recipe.train.micro_batch,
                                   recipe.data.eval_max_sequences, recipe.data.eval_seed)
            logger.log(state.step, metrics, prefix="eval")

    peak = peak_flops(engine.device, precision(ds_cfg), recipe.run.peak_tflops) * env.world_size
    t_start = time.time()
    t_last, tokens_last, step_last, flops = time.time(), state.tokens_seen, state.step, 0.0
    exit_code = 0
    while state.step < recipe.train.steps:
        items = order.rank_items(state.cursor)
        micro = [mlm_batch([corpus[i] for i in chunk], [(recipe.train.seed, state.cursor.epoch, int(i)) for i in chunk],
                           spec, special)
                 for chunk in items.reshape(plan.accumulation, plan.micro_batch)]
        agreed = agree(sum(b["mlm_labels"].numel() for b in micro), t_start, recipe.train.max_minutes)
        stop = stop_reason(agreed, env, state.step, recipe.train.max_minutes)
        if stop == "signal":
            save()
            exit_code = preemption.EXIT_RESUMABLE
        if stop:
            break
        result = optimizer_step(engine, micro, plan, agreed.count, state.step + 1 in recipe.debug.nan_at_steps)
        loss = state.record(order, result, agreed.count)
        flops += transformer_flops(hf.config, int(result.sums["tokens"]), corpus.seq_len, int(agreed.count))
        scalars = {"loss": loss, "mlm_acc": result.sums["correct"] / agreed.count, "lr": result.lr,
                   "grad_norm": result.grad_norm, "skipped": float(result.skipped)}
        if state.step % recipe.run.log_every == 0 or state.step == recipe.train.steps:
            dt = time.time() - t_last
            done_tokens = state.tokens_seen - tokens_last
            scalars.update({"tokens_per_s": done_tokens / dt, "steps_per_s": (state.step - step_last) / dt,
                            "mfu": flops / dt / peak, "tokens_seen": state.tokens_seen, **memory_mb(engine.device)})
            t_last, tokens_last, step_last, flops = time.time(), state.tokens_seen, state.step, 0.0
        logger.log(state.step, scalars)
        try:
            state.check_finite(env, recipe.train.max_nonfinite_in_a_row)
        except TrainingStopped:
            logger.close()
            raise
        if recipe.debug.step_sleep:
            time.sleep(recipe.debug.step_sleep)
        if every(recipe.run.ckpt_every, state.step, recipe.train.steps):
            save()
        if every(recipe.run.eval_every, state.step, recipe.train.steps):
            run_eval()
    if exit_code == 0:
        save()
        run_eval()
        export = checkpoint.export_hf(engine, hf, hf_tokenizer(tok, corpus.seq_len), out / "export", env,
                                      {"wellread.json": {"stage": "pretrain", "step": state.step,
                                                         "tokens_seen": state.tokens_seen,
                                                         "corpus": str(corpus.directory),
                                                         "tokenizer_sha256": corpus.tokenizer_hash}})
        log0(env, f"exported Hugging Face model to {export}")
    logger.close()
    return exit_code
