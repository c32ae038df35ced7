"""`wellread label RECIPE.yaml [--shard-index i --num-shards n] [--finalize]`: teacher soft labels.

Runs the teacher over an unlabeled transfer set (trainer/data/transfer.py) and writes a soft-label
store (layout in trainer/data/softlabels/format.py): sequence logits of a fine-tuned classifier, or
top-k MLM distributions of an MLM teacher (with the exact token ids it saw). The transfer set is
enumerated the same way by every writer; example i belongs to job shard i mod n (by default the
task's position in its Slurm array, so `--array=1-16` or `--array=0-30:2` work like `--array=0-15`)
and, inside it, to rank (i div n) mod world. Each writer skips what its finished parts already hold,
so a killed job resumes. The last writer to finish (or `--finalize`) verifies every shard and writes
the manifest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.config import dump_yaml, load_config, to_dict
from trainer.data.encoding import encode
from trainer.data.masking import MaskSpec, mask_one
from trainer.data.softlabels import MANIFEST, SoftLabelWriter, finalize, finished_parts, make_writer_id
from trainer.data.softlabels.format import labeled_roles, position_roles
from trainer.data.tokenization import load_tokenizer, special_ids, tokenizer_hash
from trainer.data.transfer import PLURAL, transfer_examples, transfer_fingerprint, transfer_inputs
from trainer.errors import UserError
from trainer.jobarray import slurm_array_position
from trainer.launcher import DistEnv, barrier, init_distributed, shutdown
from trainer.loop import log0, run_dir_lock
from trainer.models.teacher import Teacher, model_inputs, teacher_dir, teacher_fingerprint
from trainer.recipes.label import LabelOutput, LabelRecipe
from trainer.registry import add_recipe_arguments
from trainer.runlock import RunLock

FINALIZE_CLAIM = ".finalize.claim"  # created by the one writer that auto-finalizes


# ---------------------------------------------------------------------------------------------- teacher
def soft_labels(teacher: Teacher, batch: dict[str, torch.Tensor], output: LabelOutput) -> dict[str, np.ndarray]:
    """The teacher's roles of the store (trainer/data/softlabels/format.py) for a padded batch, one row per example:
    classification logits [B, C] (and [CLS] states [B, L, H] with output.cls_layers); mlm top-k ids and
    log-probabilities [B, T, k]."""
    if output.kind == "classification":
        logits, cls = teacher.classify(batch, output.cls_layers or ())
        return {"logits": logits.numpy()} | ({"cls": cls.numpy()} if cls is not None else {})
    ids, logprobs = teacher.topk(batch, output.topk)
    return {"topk_ids": ids.numpy(), "topk_logprobs": logprobs.numpy()}


def _batch(seqs: list[np.ndarray], types: list[np.ndarray], pad: int) -> dict[str, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad, dtype=np.int64)
    tt = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for r, (s, t) in enumerate(zip(seqs, types)):
        ids[r, : len(s)], tt[r, : len(s)], mask[r, : len(s)] = s, t, 1
    return {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(tt),
        "attention_mask": torch.from_numpy(mask),
    }


# ---------------------------------------------------------------------------------------------- driver
def writer_examples(recipe: LabelRecipe, shard: int, num_shards: int, env: DistEnv) -> tuple[list, int]:
    """This writer's (example id, Example) in order, and the size of the whole transfer set."""
    mine, total = [], 0
    for i, example in enumerate(transfer_examples(recipe.transfer)):
        total = i + 1
        if i % num_shards == shard and (i // num_shards) % env.world_size == env.rank:
            mine.append((i, example))
    if total == 0:
        raise UserError("the transfer set has no examples (check transfer.files / task / min_chars)")
    return mine, total


def check_inputs(recipe: LabelRecipe, model_dir: Path) -> str:
    """The transfer set's arity ("single" / "pair"), refused when the teacher was trained on the other one: a pair
    teacher reading premises alone (or a single-text teacher reading two texts) gives confident, wrong labels."""
    inputs = transfer_inputs(recipe.transfer)
    trained = model_inputs(model_dir)
    if trained is not None and trained != inputs:
        raise UserError(
            f"teacher: {model_dir} was fine-tuned on {PLURAL[trained]} but the transfer set gives {PLURAL[inputs]}"
            + (" (a pair task's split, or files with transfer.text_b_field)" if trained == "pair" else "")
        )
    if inputs == "pair" and recipe.output.kind == "mlm":
        raise UserError(
            "output.kind mlm: MLM soft labels are taken over single token sequences (DistilBERT's corpus); "
            "label sentence pairs with a classification teacher"
        )
    return inputs


def label(recipe: LabelRecipe, shard: int, num_shards: int, env: DistEnv, command: list[str]) -> int:
    model_dir = teacher_dir(recipe.teacher, "teacher")
    out = Path(recipe.output.out_dir)
    o = recipe.output
    tok = load_tokenizer(model_dir)
    specials = special_ids(tok)
    if o.cls_layers and o.kind != "classification":
        raise UserError("output.cls_layers: [CLS] states are kept for classification stores only")
    teacher = Teacher(model_dir, o.kind)
    if o.cls_layers and not (
        list(o.cls_layers) == sorted(set(o.cls_layers)) and o.cls_layers[0] >= 1 and o.cls_layers[-1] <= teacher.depth
    ):
        raise UserError(
            f"output.cls_layers: {o.cls_layers} must be increasing layers in 1..{teacher.depth} "
            f"(the teacher {model_dir} has {teacher.depth})"
        )
    mine, total = writer_examples(recipe, shard, num_shards, env)  # a bad row stops here, before any write
    writer_id = make_writer_id(shard, num_shards, env.rank, env.world_size)
    # every shape a store may need; the kind's settings (format.kind_settings) keep their own
    writer = SoftLabelWriter(
        out,
        writer_id,
        o.kind,
        num_classes=teacher.num_classes,
        k=o.topk,
        vocab_size=teacher.vocab_size,
        part_examples=o.part_examples,
        cls_layers=o.cls_layers,
        hidden_size=teacher.hidden_size,
        teacher_layers=teacher.depth,
        class_names=teacher.class_names if o.kind == "classification" else None,  # what distill's student exports
    )
    roles, positions = labeled_roles(writer.settings), position_roles(writer.settings)
    todo = mine[writer.examples_done :]
    log0(
        env,
        f"labeling {total:,} transfer examples with {model_dir} ({o.kind}); job shard {shard}/{num_shards}, "
        f"{env.world_size} rank(s); this writer: {len(mine):,}, {writer.examples_done:,} already done",
    )

    mask_spec = MaskSpec(vocab_size=teacher.vocab_size, specials=specials, mask_prob=o.mask_prob or 0.15)
    special = mask_spec.special_table()
    regression = o.kind == "classification" and teacher.num_classes == 1
    bar = _progress(len(todo), env)
    t0 = time.time()
    # sort by length inside windows so batches pad little, then restore order when writing
    for start in range(0, len(todo), o.batch_size * 32):
        window = todo[start : start + o.batch_size * 32]
        enc = encode([example for _, example in window], tok, o.max_seq_len, regression)  # as fine-tuning does
        seqs, types = enc.input_ids, enc.token_type_ids
        if o.kind == "mlm" and o.mask_prob > 0:
            seqs = [
                mask_one(s, np.random.default_rng([recipe.seed, int(eid)]), mask_spec, special)[0]
                for s, (eid, _) in zip(seqs, window)
            ]
        order = np.argsort([len(s) for s in seqs], kind="stable")
        results: list = [None] * len(window)  # per example: the teacher's roles, cut to its length (mlm)
        for b in range(0, len(order), o.batch_size):
            idx = order[b : b + o.batch_size]
            out_b = soft_labels(teacher, _batch([seqs[i] for i in idx], [types[i] for i in idx], specials.pad), o)
            for j, i in enumerate(idx):
                results[i] = {role: v[j, : len(seqs[i])] if role in positions else v[j] for role, v in out_b.items()}
        ids = np.asarray([eid for eid, _ in window], dtype=np.int64)
        given = {"gold": enc.labels, "tokens": seqs}
        writer.add(ids, **{role: given[role] if role in given else [r[role] for r in results] for role in roles})
        if bar is not None:
            bar.update(len(window))
        if recipe.debug.step_sleep:
            time.sleep(recipe.debug.step_sleep)
    writer.close()
    if bar is not None:
        bar.close()
    log0(env, f"writer {writer_id}: {len(todo):,} examples in {time.time() - t0:.1f}s")
    barrier()
    if env.is_main:
        maybe_finalize(recipe, out, total, tok, model_dir, command, required=num_shards == 1)
    barrier()
    return 0


def maybe_finalize(
    recipe: LabelRecipe, out: Path, total: int, tok, model_dir: Path, command: list[str], required: bool
) -> dict | None:
    """Write the manifest once every example is covered (the last writer does it, or --finalize)."""
    done = sum(int(info["examples"]) for info in _all_parts(out))
    if done < total:
        msg = f"{out}: {done:,}/{total:,} examples labeled; other writers still running (or run --finalize later)"
        if required:
            raise UserError(msg)
        print(msg, file=sys.stderr)
        return None
    if not required and not _claim_finalize(out):
        print(
            f"{out}: every example is labeled; another writer is finalizing (if it died, run --finalize)",
            file=sys.stderr,
        )
        return None
    header = {
        "teacher": teacher_fingerprint(model_dir),
        "tokenizer_hash": tokenizer_hash(tok),
        "transfer_fingerprint": transfer_fingerprint(recipe.transfer),
        "inputs": transfer_inputs(recipe.transfer),  # "single" or "pair": what a student must be fed
        "command": command,
        "config": to_dict(recipe),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = finalize(out, header, expected_examples=total)
    print(f"{out}: soft-label store complete ({total:,} examples, {len(manifest['shards'])} shards)", file=sys.stderr)
    return manifest


def _claim_finalize(out: Path) -> bool:
    """Writers that finish together may all see the last part: an exclusive create lets one finalize."""
    try:
        os.close(os.open(out / FINALIZE_CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _all_parts(out: Path) -> list[dict]:
    writers = {p.name.split("-", 1)[1].rsplit("-", 1)[0] for p in out.glob("part-*.json")}
    return [info for w in sorted(writers) for info in finished_parts(out, w, cleanup=False)]  # others may run


def _progress(total: int, env: DistEnv):
    if not env.is_main or total == 0:
        return None

    return tqdm(total=total, unit="ex", desc="label", file=sys.stderr, mininterval=1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--shard-index",
        type=int,
        default=None,
        help="this job's share of the transfer set (default: position in the Slurm array, or 0)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="number of independent jobs (default: the Slurm array's task count, or 1)",
    )
    p.add_argument("--finalize", action="store_true", help="only verify every shard and write the manifest")


def job_shard(shard_index: int | None, num_shards: int | None, environ: Mapping[str, str]) -> tuple[int, int]:
    """This job's share of the transfer set: the flags, else the position in the Slurm array, else (0, 1)."""
    array = slurm_array_position(environ) if shard_index is None else None
    if array is not None and num_shards is not None and num_shards != array[1]:
        raise UserError(
            f"--num-shards {num_shards} but the Slurm array has {array[1]} tasks: pass --shard-index "
            "too (e.g. --shard-index $SLURM_ARRAY_TASK_ID when re-running some shards)"
        )
    shard = shard_index if shard_index is not None else (array[0] if array else 0)
    count = num_shards if num_shards is not None else (array[1] if array else 1)
    if not 0 <= shard < count:
        raise UserError(f"--shard-index {shard} must be in [0, --num-shards {count})")
    return shard, count


def main(args: argparse.Namespace) -> int:
    recipe = load_config(LabelRecipe, args.recipe, args.overrides)
    shard, num_shards = job_shard(args.shard_index, args.num_shards, os.environ)
    command = ["wellread", "label", args.recipe, *args.overrides]
    if args.finalize:
        model_dir = teacher_dir(recipe.teacher, "teacher")
        out = Path(recipe.output.out_dir)
        if (out / MANIFEST).is_file():
            print(f"{out}: already finalized", file=sys.stderr)
            return 0
        with RunLock(out):  # exclusive: no shard may still be writing
            total = sum(1 for _ in transfer_examples(recipe.transfer))
            maybe_finalize(recipe, out, total, load_tokenizer(model_dir), model_dir, command, required=True)
        return 0
    check_inputs(recipe, teacher_dir(recipe.teacher, "teacher"))  # before anything is written
    env = init_distributed()
    try:
        part = f"shard-{shard}-of-{num_shards}" if num_shards > 1 else None  # shards write one store side by side
        with run_dir_lock(Path(recipe.output.out_dir), env, part):
            log0(env, dump_yaml(recipe))
            return label(recipe, shard, num_shards, env, command)
    finally:
        shutdown()
