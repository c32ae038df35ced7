#!/usr/bin/env python
"""Soft-label store (trainer/data/softlabels/): storage, reader throughput and labeling overhead, in one run.

1. Storage. Real stores written with SoftLabelWriter + finalize: classification (C classes, fp16
   logits + uint32 id + int8 gold + uint32 order entry) and MLM top-k for several k (fp16 log-probs +
   uint16 ids + the uint16 input token), on synthetic but realistic data (top-k of log_softmax of
   N(0, 3^2) logits over the 30,522-token vocabulary). Bytes = every file on disk (headers, sidecars,
   order.bin, manifest) divided by examples (classification) or positions (MLM), versus dense fp32
   logits (C*4 bytes per example, vocab*4 bytes per position). Classification target: <= 16 B/example.
2. Reader throughput. `SoftLabelStore.batch` in `StoreSampler` order (trainer/data/sampling.py;
   shuffled, global batch 32, one rank), sampler included, versus the usual approach: `np.load` the
   same data from a dense `.npy`
   (classification: fp32 logits + int64 gold; MLM: the same top-k padded to [N, T, k] in the store's
   own dtypes), then index it with the same indices and produce the same int64/fp32 batch. Both read
   files this run just wrote (page cache). Compared with the student's consumption rate: examples/s of
   a bert-L4-H256 step (forward + backward + AdamW) on batch 32 x seq 128 with a KD loss against the
   store's batch (classification: KL to the teacher logits; MLM: kernels.dispatch.linear_kl_div against
   the top-k at every non-pad position).
3. Labeling overhead. Teacher = all-MiniLM-L6-v2 as BertForSequenceClassification (2 labels, random
   head: throughput only) on the first N SST-2 train sentences. (a) plain inference: what
   trainer.stages.label.label does minus the store (same teacher loading, transfer reader, tokenization,
   length-sorted windows, trainer.stages.label.Teacher forward passes), outputs discarded; (b) the real
   `trainer.stages.label.label(...)` in this process (writer, fp16 parts, fsync, sha256, finalize with the
   teacher/transfer fingerprints). Same process, so the same torch threads and tokenizer settings;
   run a, b, a, b (after an untimed warm-up of both) and keep the best of each. In-process rather
   than a CLI subprocess: interpreter start, imports and process-group setup are not labeling, and
   the plain side would need the same; model loading and reading the transfer set are in both.

    .venv/bin/python tools/bench/softlabels.py --out bench-softlabels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HEADER = {"tokenizer_hash": "bench", "transfer_fingerprint": None, "command": ["tools/bench/softlabels.py"]}
MB = 1e6


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def bytes_by_role(directory: Path) -> dict[str, int]:
    """On-disk bytes per role (data files incl. their 32-byte headers), plus order.bin and the JSON files."""
    out: dict[str, int] = {}
    for p in directory.iterdir():
        if p.name.endswith(".bin"):
            role = p.name.split(".")[-2] if p.name.startswith("part-") else p.stem
        elif p.name.endswith(".json"):
            role = "manifest+sidecars (json)"
        else:
            role = "other"
        out[role] = out.get(role, 0) + p.stat().st_size
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------- data
def topk_pool(vocab: int, rows: int, kmax: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-kmax (ids, log-probs) of log_softmax of N(0, 3^2) logits over the full vocabulary, `rows` positions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids, lps = [], []
    for start in range(0, rows, 256):
        logits = torch.randn(min(256, rows - start), vocab, generator=g) * 3.0
        values, top = torch.log_softmax(logits, dim=-1).topk(kmax, dim=-1)
        ids.append(top.numpy())
        lps.append(values.numpy())
    return np.concatenate(ids), np.concatenate(lps)


def mlm_arrays(n: int, seq: int, k: int, vocab: int, pool: tuple[np.ndarray, np.ndarray], seed: int) -> dict:
    """Dense [n, seq(, k)] arrays in the store's dtypes: positions draw their top-k from the realistic pool."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(pool[0]), size=(n, seq))
    return {
        "tokens": rng.integers(999, vocab, size=(n, seq)).astype(np.uint16),  # past BERT's [unused] block
        "topk_ids": pool[0][rows, :k].astype(np.uint16),
        "topk_logprobs": pool[1][rows, :k].astype(np.float16),
    }


def write_classification(directory: Path, logits: np.ndarray, gold: np.ndarray, part_examples: int) -> float:
    from trainer.data.softlabels import SoftLabelWriter, finalize, make_writer_id

    t = time.perf_counter()
    n, c = logits.shape
    with SoftLabelWriter(
        directory, make_writer_id(0, 1, 0, 1), "classification", num_classes=c, part_examples=part_examples
    ) as w:
        for a in range(0, n, 2048):  # the labeler's window size (batch 64 x 32)
            w.add_classification(np.arange(a, min(a + 2048, n)), logits[a : a + 2048], gold[a : a + 2048])
    finalize(directory, HEADER, expected_examples=n)
    return time.perf_counter() - t


def write_mlm(directory: Path, arrays: dict, k: int, vocab: int, part_examples: int) -> float:
    from trainer.data.softlabels import SoftLabelWriter, finalize, make_writer_id

    t = time.perf_counter()
    n = len(arrays["tokens"])
    with SoftLabelWriter(
        directory, make_writer_id(0, 1, 0, 1), "mlm", k=k, vocab_size=vocab, part_examples=part_examples
    ) as w:
        for a in range(0, n, 256):
            b = min(a + 256, n)
            w.add_mlm(
                np.arange(a, b),
                list(arrays["tokens"][a:b]),
                list(arrays["topk_ids"][a:b]),
                list(arrays["topk_logprobs"][a:b]),
            )
    finalize(directory, HEADER, expected_examples=n)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- 1. storage
def storage(tmp: Path, args, pool) -> dict:
    from trainer.data.softlabels import SoftLabelStore

    out: dict = {"classification": {}, "mlm": []}
    rng = np.random.default_rng(1)
    n, c = args.cls_examples, args.num_classes
    logits = rng.normal(0, 2, size=(n, c)).astype(np.float32)
    gold = rng.integers(0, c, size=n)
    cdir = tmp / "cls"
    write_s = write_classification(cdir, logits, gold, args.part_examples)
    np.save(tmp / "cls-logits.npy", logits)  # the same data, dense, for the reader baseline
    np.save(tmp / "cls-gold.npy", gold.astype(np.int64))
    total = dir_bytes(cdir)
    dense = c * 4
    by_role = bytes_by_role(cdir)
    row = {
        "examples": n,
        "num_classes": c,
        "shards": SoftLabelStore(cdir, verify="size").num_shards,
        "write_s": write_s,
        "total_bytes": total,
        "bytes_per_example": total / n,
        "logits_only_bytes_per_example": 2 * c,
        "dense_fp32_bytes_per_example": dense,
        "store_over_dense": total / n / dense,
        "by_role": by_role,
        "by_role_bytes_per_example": {role: b / n for role, b in by_role.items()},
        "target_bytes_per_example": 16,
        "target_met": total / n <= 16,
    }
    out["classification"] = row
    parts = " + ".join(f"{role} {b / n:.2f}" for role, b in by_role.items())
    print(
        f"storage classification C={c}, N={n:,}: {row['bytes_per_example']:.2f} B/example on disk, all files "
        f"({parts}) vs dense fp32 logits {dense} B: store/dense = {row['store_over_dense']:.2f}x (logits alone: "
        f"{2 * c / dense:.2f}x); target <= 16 B: {'met' if row['target_met'] else 'MISSED'}",
        flush=True,
    )
    for k in args.ks:
        arrays = mlm_arrays(args.mlm_storage_examples, args.seq_len, k, args.vocab, pool, seed=10 + k)
        mdir = tmp / f"mlm-k{k}"
        write_s = write_mlm(mdir, arrays, k, args.vocab, args.mlm_part_examples)
        positions = arrays["tokens"].size
        total = dir_bytes(mdir)
        dense = args.vocab * 4
        row = {
            "k": k,
            "examples": len(arrays["tokens"]),
            "positions": positions,
            "write_s": write_s,
            "total_bytes": total,
            "bytes_per_token": total / positions,
            "payload_bytes_per_token": 4 * k + 2,
            "dense_fp32_bytes_per_token": dense,
            "dense_over_store": dense / (total / positions),
            "by_role": bytes_by_role(mdir),
        }
        out["mlm"].append(row)
        print(
            f"storage mlm k={k}: {row['bytes_per_token']:.2f} B/token on disk (payload fp16+uint16 top-k + uint16 "
            f"token = {4 * k + 2} B) vs dense fp32 vocab logits {dense:,} B: {row['dense_over_store']:,.0f}x smaller",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------------------------------- 2. reader
def read_loop(n: int, batch: int, seed: int, fetch) -> tuple[float, int]:
    """One epoch in StoreSampler order (sampler included), calling fetch(indices) per batch."""
    from trainer.data.sampling import Cursor, StoreSampler

    sampler = StoreSampler(n, batch, 0, 1, seed)
    cursor, examples = Cursor(0, 0), 0
    t = time.perf_counter()
    for _ in range(sampler.batches_per_epoch):
        idx = sampler.rank_items(cursor)
        fetch(idx)
        examples += idx.size
        cursor = sampler.advance(cursor)
    return time.perf_counter() - t, examples


def open_times(directory: Path) -> dict:
    from trainer.data.softlabels import SoftLabelStore

    t = time.perf_counter()
    SoftLabelStore(directory, verify="full")
    full = time.perf_counter() - t
    t = time.perf_counter()
    store = SoftLabelStore(directory, verify="size")
    return {"store": store, "open_full_s": full, "open_size_s": time.perf_counter() - t}


def reader_classification(tmp: Path, args) -> dict:
    """Over the classification store of the storage section."""
    n = args.cls_examples
    cdir = tmp / "cls"  # written by storage(), with its dense copy cls-logits.npy / cls-gold.npy
    opened = open_times(cdir)
    store = opened.pop("store")
    per_ex_store = dir_bytes(cdir) / n
    secs, ex = read_loop(n, args.batch, args.seed, lambda idx: store.batch(idx))
    ours = {
        **opened,
        "seconds": secs,
        "examples": ex,
        "examples_per_s": ex / secs,
        "mb_per_s": ex * per_ex_store / secs / MB,
        "bytes_per_example": per_ex_store,
    }

    t = time.perf_counter()
    d_logits = np.load(tmp / "cls-logits.npy")
    d_gold = np.load(tmp / "cls-gold.npy")
    load_s = time.perf_counter() - t
    per_ex_dense = ((tmp / "cls-logits.npy").stat().st_size + (tmp / "cls-gold.npy").stat().st_size) / n

    def dense_batch(idx):
        return {"example_ids": idx.copy(), "logits": d_logits[idx], "gold": d_gold[idx]}

    secs, ex = read_loop(n, args.batch, args.seed, dense_batch)
    dense = {
        "load_s": load_s,
        "seconds": secs,
        "examples": ex,
        "examples_per_s": ex / secs,
        "mb_per_s": ex * per_ex_dense / secs / MB,
        "bytes_per_example": per_ex_dense,
        "examples_per_s_incl_load": ex / (secs + load_s),
    }
    return {"examples": n, "batch": args.batch, "ours": ours, "npy": dense}


def reader_mlm(tmp: Path, args, pool) -> tuple[dict, list[dict]]:
    n, k, seq = args.mlm_examples, args.reader_k, args.seq_len
    arrays = mlm_arrays(n, seq, k, args.vocab, pool, seed=99)
    mdir = tmp / "mlm-reader"
    write_s = write_mlm(mdir, arrays, k, args.vocab, args.mlm_part_examples)
    for name, arr in arrays.items():
        np.save(tmp / f"mlm-{name}.npy", arr)
    np.save(tmp / "mlm-lengths.npy", np.full(n, seq, dtype=np.int64))
    del arrays
    opened = open_times(mdir)
    store = opened.pop("store")
    per_ex_store = dir_bytes(mdir) / n
    secs, ex = read_loop(n, args.batch, args.seed, lambda idx: store.batch(idx, pad_to=seq))
    ours = {
        **opened,
        "write_s": write_s,
        "seconds": secs,
        "examples": ex,
        "examples_per_s": ex / secs,
        "mb_per_s": ex * per_ex_store / secs / MB,
        "bytes_per_example": per_ex_store,
        "store_bytes": dir_bytes(mdir),
    }

    names = ("tokens", "topk_ids", "topk_logprobs", "lengths")
    t = time.perf_counter()
    d = {name: np.load(tmp / f"mlm-{name}.npy") for name in names}
    load_s = time.perf_counter() - t
    per_ex_dense = sum((tmp / f"mlm-{name}.npy").stat().st_size for name in names) / n
    positions = np.arange(seq)

    def dense_batch(idx):
        return {
            "example_ids": idx.copy(),
            "input_ids": d["tokens"][idx].astype(np.int64),
            "attention_mask": (positions[None] < d["lengths"][idx][:, None]).astype(np.int64),
            "topk_ids": d["topk_ids"][idx].astype(np.int64),
            "topk_logprobs": d["topk_logprobs"][idx].astype(np.float32),
        }

    secs, ex = read_loop(n, args.batch, args.seed, dense_batch)
    dense = {
        "load_s": load_s,
        "seconds": secs,
        "examples": ex,
        "examples_per_s": ex / secs,
        "mb_per_s": ex * per_ex_dense / secs / MB,
        "bytes_per_example": per_ex_dense,
        "examples_per_s_incl_load": ex / (secs + load_s),
    }
    # a few real batches for the student step
    from trainer.data.sampling import Cursor, StoreSampler

    sampler, cursor, batches = StoreSampler(n, args.batch, 0, 1, args.seed), Cursor(0, 0), []
    for _ in range(3):
        batches.append(store.batch(sampler.rank_items(cursor), pad_to=seq))
        cursor = sampler.advance(cursor)
    return {"examples": n, "seq_len": seq, "k": k, "batch": args.batch, "ours": ours, "npy": dense}, batches


# ---------------------------------------------------------------------------------------------- student
def student_rate(kind: str, batches: list[dict], args) -> dict:
    """Examples/s of bert-L4-H256 forward + backward + AdamW on the store's batches (after warm-up)."""
    import torch
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from kernels.dispatch import kl_div, linear_kl_div
    from trainer.models.zoo import bert_config

    torch.manual_seed(0)
    cfg = bert_config(args.student)
    if kind == "classification":
        cfg.num_labels = args.num_classes
        model = BertForSequenceClassification(cfg)
    else:
        model = BertForMaskedLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for b in batches:
        bsz = len(b["example_ids"])
        if kind == "classification":  # the classification store holds no tokens: random ids, full length
            ids = torch.randint(999, cfg.vocab_size, (bsz, args.seq_len), generator=gen)
            tensors.append((ids, torch.ones_like(ids), torch.from_numpy(b["logits"])))
        else:
            tensors.append(
                tuple(torch.from_numpy(b[key]) for key in ("input_ids", "attention_mask", "topk_ids", "topk_logprobs"))
            )
    head = getattr(model, "cls", None)
    examples, t0 = 0, time.perf_counter()
    for step in range(args.student_warmup + args.student_steps):
        if step == args.student_warmup:
            examples, t0 = 0, time.perf_counter()
        if kind == "classification":
            ids, mask, teacher = tensors[step % len(tensors)]
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = kl_div(logits, teacher)
        else:
            ids, mask, top_ids, top_lp = tensors[step % len(tensors)]
            hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            h = head.predictions.transform(hidden.reshape(-1, hidden.shape[-1]))
            k = top_ids.shape[-1]
            loss = linear_kl_div(
                h,
                head.predictions.decoder.weight,
                head.predictions.decoder.bias,
                (top_ids.reshape(-1, k), top_lp.reshape(-1, k)),
                mask=mask.reshape(-1).bool(),
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        examples += ids.shape[0]
    secs = time.perf_counter() - t0
    return {
        "model": args.student,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.student_steps,
        "warmup": args.student_warmup,
        "seconds": secs,
        "examples_per_s": examples / secs,
        "final_loss": loss.item(),
    }


# ---------------------------------------------------------------------------------------------- 3. labeling
class _Clock:
    """Accumulates the time spent in wrapped functions (the same wrappers are active for (a) and (b))."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def reset(self) -> None:
        self.totals = {}

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t

        return timed


def plain_inference(recipe) -> int:
    """trainer.stages.label.label minus the store: same loading, reader, tokenization, sorting and forward passes."""
    import torch

    from trainer.data.tokenization import load_tokenizer, special_ids
    from trainer.launcher import DistEnv
    from trainer.models.teacher import Teacher
    from trainer.models.zoo import resolve
    from trainer.stages import label as lab

    model_dir = resolve(recipe.teacher)
    o = recipe.output
    tok = load_tokenizer(model_dir)
    specials = special_ids(tok)
    teacher = Teacher(model_dir, o.kind, torch.device("cpu"))
    todo, _ = lab.writer_examples(recipe, 0, 1, DistEnv())
    tok.enable_truncation(max_length=o.max_seq_len)
    for start in range(0, len(todo), o.batch_size * 32):
        window = todo[start : start + o.batch_size * 32]
        encodings = tok.encode_batch([example.text_a for _, example in window], add_special_tokens=True)
        seqs = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        types = [np.asarray(e.type_ids, dtype=np.int64) for e in encodings]
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for b in range(0, len(order), o.batch_size):
            idx = order[b : b + o.batch_size]
            lab.soft_labels(teacher, lab._batch([seqs[i] for i in idx], [types[i] for i in idx], specials.pad), o)
    return len(todo)


def labeling(tmp: Path, args) -> dict:
    import torch
    import transformers

    from trainer.data.transfer import TransferSection
    from trainer.launcher import DistEnv
    from trainer.models.zoo import minilm_dir
    from trainer.recipes.label import LabelOutput, LabelRecipe
    from trainer.stages import label as lab

    teacher_dir = tmp / "teacher"
    if not (teacher_dir / "config.json").is_file():
        # A saved classifier (MiniLM + a seeded 2-class head): `label` refuses a teacher whose head would be newly
        # initialised on load; the bench times labeling, for which any fixed head serves.
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)
        model.save_pretrained(teacher_dir)
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if (minilm_dir() / name).is_file():
                shutil.copy(minilm_dir() / name, teacher_dir / name)
    clock = _Clock()
    lab.soft_labels = clock.wrap("forward_s", lab.soft_labels)
    lab.maybe_finalize = clock.wrap("finalize_s", lab.maybe_finalize)  # incl. teacher/transfer fingerprints
    lab.teacher_fingerprint = clock.wrap("weights_sha256_s", lab.teacher_fingerprint)

    def recipe(out_dir: Path, n: int):
        r = LabelRecipe(
            teacher=str(teacher_dir),
            transfer=TransferSection(task="sst2", task_split="train", data_root=str(args.data_root), max_examples=n),
            output=LabelOutput(
                out_dir=str(out_dir), kind="classification", max_seq_len=args.seq_len, batch_size=args.label_batch
            ),
        )
        r.validate()
        return r

    # untimed warm-up of both paths: page cache, oneDNN, first-call imports (trainer.data.masking, tqdm)
    plain_inference(recipe(tmp / "warm-up", 64))
    lab.label(recipe(tmp / "warm-up", 64), 0, 1, DistEnv(), ["wellread", "label", "(warm-up)"])
    runs: dict[str, list[dict]] = {"plain": [], "label": []}
    for rep in range(args.label_repeats):
        for name in ("plain", "label"):
            clock.reset()
            out = tmp / f"label-{rep}"
            t = time.perf_counter()
            if name == "plain":
                n = plain_inference(recipe(out, args.label_examples))
            else:
                lab.label(
                    recipe(out, args.label_examples),
                    0,
                    1,
                    DistEnv(),
                    ["wellread", "label", "(in-process: tools/bench/softlabels.py)"],
                )
                n = json.loads((out / "manifest.json").read_text())["totals"]["examples"]
            secs = time.perf_counter() - t
            runs[name].append({"seconds": secs, "examples": n, "examples_per_s": n / secs, **clock.totals})
            print(
                f"  labeling rep {rep} {name}: {secs:.2f}s ({n / secs:,.0f} ex/s; forward "
                f"{clock.totals.get('forward_s', 0):.2f}s)",
                flush=True,
            )
    return {
        "teacher": f"{minilm_dir()} + a seeded 2-class head ({teacher_dir})",
        "examples": args.label_examples,
        "batch_size": args.label_batch,
        "max_seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        **label_overhead(runs),
    }


def label_overhead(runs: dict[str, list[dict]], tolerance: float = 0.10) -> dict:
    """Overhead of (b) over (a), best of each, plus a check that the comparison is not noise.

    Both sides run the very same forward passes, so their forward seconds should agree; when the
    best runs' forward times differ by more than `tolerance`, machine load (not the store) decided the
    result and `overhead_valid` is False. `nonforward_overhead` is the noise-robust estimate: the extra
    time (b) spends outside the teacher forward (best of each), over the fastest plain-equivalent run
    (the fastest forward seen on either side + (a)'s best non-forward time).
    """
    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    a, b = best["plain"], best["label"]
    overhead = (b["seconds"] - a["seconds"]) / a["seconds"]
    forward_ratio = b["forward_s"] / a["forward_s"]
    nonfwd = {name: min(r["seconds"] - r["forward_s"] for r in rs) for name, rs in runs.items()}
    fastest = min(r["forward_s"] for rs in runs.values() for r in rs) + nonfwd["plain"]
    extra = nonfwd["label"] - nonfwd["plain"]
    return {
        "best_plain_s": a["seconds"],
        "best_label_s": b["seconds"],
        "best_label_finalize_s": b.get("finalize_s"),
        "best_label_weights_sha256_s": b.get("weights_sha256_s"),
        "overhead": overhead,
        "best_forward_ratio": forward_ratio,
        "overhead_valid": abs(forward_ratio - 1) <= tolerance,
        "nonforward_plain_s": nonfwd["plain"],
        "nonforward_label_s": nonfwd["label"],
        "nonforward_extra_s": extra,
        "fastest_plain_equivalent_s": fastest,
        "nonforward_overhead": extra / fastest,
    }


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--cls-examples", type=int, default=200_000, help="classification store (storage + reader)")
    p.add_argument("--part-examples", type=int, default=8192, help="examples per part (the labeler's default)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128], help="MLM top-k for the storage section")
    p.add_argument("--mlm-storage-examples", type=int, default=2000)
    p.add_argument("--mlm-part-examples", type=int, default=1024, help="MLM examples per part (~4 MB/k-slot)")
    p.add_argument("--pool", type=int, default=4096, help="positions of real log_softmax top-k drawn from")
    p.add_argument("--mlm-examples", type=int, default=20_000, help="MLM reader store (length --seq-len each)")
    p.add_argument("--reader-k", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="global batch (one rank)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--student", default="bert-L4-H256")
    p.add_argument("--student-steps", type=int, default=5)
    p.add_argument("--student-warmup", type=int, default=2)
    p.add_argument("--label-examples", type=int, default=2000)
    p.add_argument("--label-batch", type=int, default=64, help="labeler batch size (LabelOutput default)")
    p.add_argument("--label-repeats", type=int, default=2)
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared/data", help="holds glue/SST-2/")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tmp", type=Path, default=None, help="where to write the stores (default: system temp)")
    p.add_argument("--out", type=Path, default=Path("bench-softlabels.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    results: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
    }
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench-softlabels-") as tmp:
        tmp = Path(tmp)
        pool = topk_pool(args.vocab, args.pool, max(max(args.ks), args.reader_k), args.seed)
        results["storage"] = storage(tmp, args, pool)

        rc = reader_classification(tmp, args)
        rm, mlm_batches = reader_mlm(tmp, args, pool)
        from trainer.data.softlabels import SoftLabelStore

        cls_store = SoftLabelStore(tmp / "cls", verify="size")
        cls_batches = [cls_store.batch(np.arange(i * args.batch, (i + 1) * args.batch)) for i in range(3)]
        for kind, row, batches in (("classification", rc, cls_batches), ("mlm", rm, mlm_batches)):
            row["student"] = student_rate(kind, batches, args)
            row["reader_over_student"] = row["ours"]["examples_per_s"] / row["student"]["examples_per_s"]
            row["ours_over_npy_indexing"] = row["ours"]["examples_per_s"] / row["npy"]["examples_per_s"]
            what = (
                f"C={args.num_classes}, N={row['examples']:,}"
                if kind == "classification"
                else f"k={row['k']}, N={row['examples']:,} x {row['seq_len']} positions"
            )
            print(
                f"reader {kind} ({what}, batch {args.batch}, StoreSampler order): store "
                f"{row['ours']['examples_per_s']:,.0f} ex/s ({row['ours']['mb_per_s']:,.1f} MB/s; open "
                f"{row['ours']['open_size_s']:.3f}s size-checked / {row['ours']['open_full_s']:.3f}s sha256) | "
                f"np.load .npy: load {row['npy']['load_s']:.3f}s, then {row['npy']['examples_per_s']:,.0f} ex/s "
                f"({row['npy']['mb_per_s']:,.1f} MB/s) | store/npy indexing {row['ours_over_npy_indexing']:.2f}x | "
                f"student {args.student} {row['student']['examples_per_s']:.1f} ex/s | reader/student "
                f"{row['reader_over_student']:,.0f}x (target >= 50x: "
                f"{'met' if row['reader_over_student'] >= 50 else 'MISSED'})",
                flush=True,
            )
        results["reader"] = {"classification": rc, "mlm": rm}

        lab = labeling(tmp, args)
        results["labeling"] = lab
        verdict = (
            ("met" if lab["overhead"] < 0.10 else "MISSED")
            if lab["overhead_valid"]
            else (
                f"NOT MEANINGFUL: the identical forward passes took {lab['best_forward_ratio']:.2f}x as long in (b) "
                "as in (a), machine load decided it"
            )
        )
        print(
            f"labeling {lab['examples']:,} SST-2 sentences, all-MiniLM-L6-v2 classifier, batch "
            f"{lab['batch_size']}, {lab['torch_threads']} threads, best of {args.label_repeats}: plain inference "
            f"{lab['best_plain_s']:.2f}s ({lab['examples'] / lab['best_plain_s']:,.0f} ex/s) | wellread label "
            f"{lab['best_label_s']:.2f}s ({lab['examples'] / lab['best_label_s']:,.0f} ex/s; finalize "
            f"{lab['best_label_finalize_s']:.2f}s of it, incl. weights sha256 "
            f"{lab['best_label_weights_sha256_s']:.2f}s) | overhead {lab['overhead']:+.1%} (target < 10%: "
            f"{verdict})",
            flush=True,
        )
        print(
            f"labeling, outside the teacher forward (noise-robust): plain {lab['nonforward_plain_s']:.2f}s, label "
            f"{lab['nonforward_label_s']:.2f}s, extra {lab['nonforward_extra_s']:.2f}s = "
            f"{lab['nonforward_overhead']:+.1%} of the fastest plain-equivalent run "
            f"({lab['fastest_plain_equivalent_s']:.2f}s)",
            flush=True,
        )
    results["wall_s"] = time.time() - t_start
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
