#!/usr/bin/env python
"""Verify a soft-label store (layout: trainer/data/softlabels/format.py) and summarise what the teacher gave it.

    python tools/inspect_softlabels.py runs/labels/sst2-bert-base [--json]

Checks every file's sha256 and shape against manifest.json, that the values are finite
log-probabilities / logits with ids inside the vocabulary, and that example ids are unique, then
prints counts, mean teacher entropy, teacher accuracy on gold labels (classification) and the
probability mass the stored top-k keeps (mlm). Any problem: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from trainer.data.softlabels import SoftLabelStore
from trainer.errors import UserError
from trainer.registry import run_main

CHUNK = 1 << 16  # rows per read: bounded memory however large the store
LOGPROB_TOL = 1e-2  # fp16 rounding of log p near 0 may land slightly above 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", type=Path, help="soft-label store directory (holds manifest.json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _entropy(logp: np.ndarray) -> np.ndarray:
    p = np.exp(logp)
    return -(p * np.where(p > 0, logp, 0.0)).sum(axis=-1)


def _scan_classification(store: SoftLabelStore, bar) -> dict:
    c = store.num_classes
    entropy, labelled, correct = 0.0, 0, 0
    for j, name in enumerate(store.shard_names):
        arr = store.shard(j)
        n = len(arr["ids"])
        for a in range(0, n, CHUNK):
            logits = np.asarray(arr["logits"][a : a + CHUNK], dtype=np.float64)
            if not np.isfinite(logits).all():
                raise UserError(f"{store.directory}: shard {name} holds NaN/inf logits")
            gold = np.asarray(arr["gold"][a : a + CHUNK])
            if ((gold < -1) | (gold >= c)).any():
                raise UserError(f"{store.directory}: shard {name} holds gold labels outside [-1, {c})")
            entropy += float(_entropy(_log_softmax(logits)).sum())
            known = gold >= 0
            labelled += int(known.sum())
            correct += int((logits.argmax(axis=1) == gold)[known].sum())
            bar.update(len(logits))
    return {
        "mean_entropy_nats": entropy / len(store),
        "max_entropy_nats": float(np.log(c)),
        "gold_labelled": labelled,
        "teacher_accuracy": correct / labelled if labelled else None,
    }


def _scan_mlm(store: SoftLabelStore, bar) -> dict:
    vocab = store.vocab_size
    positions, entropy, mass_sum, kl_sum, mass_min = 0, 0.0, 0.0, 0.0, float("inf")
    for j, name in enumerate(store.shard_names):
        arr = store.shard(j)
        t = len(arr["tokens"])
        for a in range(0, t, CHUNK):
            lp = np.asarray(arr["topk_logprobs"][a : a + CHUNK], dtype=np.float64)
            top = np.asarray(arr["topk_ids"][a : a + CHUNK])
            tokens = np.asarray(arr["tokens"][a : a + CHUNK])
            if np.isnan(lp).any() or lp.max() > LOGPROB_TOL:
                raise UserError(f"{store.directory}: shard {name} holds top-k log-probabilities that are NaN or > 0")
            if int(top.max()) >= vocab or int(tokens.max()) >= vocab or min(int(top.min()), int(tokens.min())) < 0:
                raise UserError(f"{store.directory}: shard {name} holds token ids outside the vocabulary [0, {vocab})")
            mass = np.exp(lp).sum(axis=1)
            if mass.max() > 1 + LOGPROB_TOL:
                raise UserError(f"{store.directory}: shard {name}: top-k probabilities sum to {mass.max():.3f} > 1")
            entropy += float(_entropy(_log_softmax(lp)).sum())
            mass_sum += float(mass.sum())
            kl_sum += float(np.maximum(-np.log(np.maximum(mass, 1e-300)), 0.0).sum())
            mass_min = min(mass_min, float(mass.min()))
            positions += len(lp)
            bar.update(len(lp))
    return {
        "positions": positions,
        "mean_positions_per_example": positions / len(store),
        "mean_entropy_topk_renormalised_nats": entropy / positions if positions else None,
        "topk_mass_retained": mass_sum / positions if positions else None,
        "topk_mass_min": mass_min if positions else None,
        "kl_topk_to_full_nats": kl_sum / positions if positions else None,
    }


def _check_ids(store: SoftLabelStore) -> None:
    ids = np.sort(np.concatenate([np.array(store.shard(j)["ids"]) for j in range(store.num_shards)]))
    if (np.diff(ids) <= 0).any():
        raise UserError(f"{store.directory}: example ids are not unique")
    expected = store.manifest.get("expected_examples")
    if expected is not None and (ids.size != expected or ids[0] != 0 or ids[-1] != expected - 1):
        raise UserError(f"{store.directory}: example ids do not cover 0..{expected - 1} exactly once")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    store = SoftLabelStore(args.store, verify="full")
    _check_ids(store)
    mlm = store.kind == "mlm"
    total = store.manifest["totals"]["positions"] if mlm else len(store)
    with tqdm(
        total=total,
        unit="pos" if mlm else "ex",
        unit_scale=True,
        desc="scan",
        file=sys.stderr,
        mininterval=0.5,
        disable=True if args.no_progress else None,
    ) as bar:
        stats = _scan_mlm(store, bar) if mlm else _scan_classification(store, bar)
    header = store.header
    report = {
        "store": str(args.store),
        "kind": store.kind,
        "shards": store.num_shards,
        "examples": len(store),
        "num_classes": store.num_classes,
        "class_names": store.class_names,
        "k": store.k,
        "vocab_size": store.vocab_size,
        "bytes": store.manifest["totals"]["bytes"],
        "checksums": "ok",
        **stats,
        "tokenizer_hash": header.get("tokenizer_hash"),
        "transfer_fingerprint": header.get("transfer_fingerprint"),
        "teacher": header.get("teacher"),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.store}: {store.kind} soft labels, {report['shards']} shard(s), {len(store):,} examples, "
        f"{report['bytes'] / 2**20:,.1f} MiB, checksums ok"
    )
    if mlm:
        print(
            f"  positions: {stats['positions']:,} ({stats['mean_positions_per_example']:.1f} per example), "
            f"k={store.k}, vocab {store.vocab_size:,}"
        )
        if stats["positions"]:
            entropy = stats["mean_entropy_topk_renormalised_nats"]
            print(f"  mean teacher entropy (renormalised top-k): {entropy:.4f} nats")
            print(
                f"  top-k mass retained: mean {stats['topk_mass_retained']:.4f}, min {stats['topk_mass_min']:.4f}; "
                f"KL(top-k renormalised || full) = mean -log(mass): {stats['kl_topk_to_full_nats']:.4f} nats"
            )
    else:
        names = f" ({', '.join(store.class_names)})" if store.class_names else ""
        print(
            f"  classes: {store.num_classes}{names}; mean teacher entropy: {stats['mean_entropy_nats']:.4f} nats "
            f"(max {stats['max_entropy_nats']:.4f})"
        )
        acc = stats["teacher_accuracy"]
        print(
            f"  teacher accuracy: {acc:.4f} on {stats['gold_labelled']:,} gold-labelled examples"
            if acc is not None
            else "  teacher accuracy: n/a (no gold labels)"
        )
    print(
        f"  tokenizer {str(report['tokenizer_hash'])[:12]}.., transfer set {str(report['transfer_fingerprint'])[:12]}.."
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
