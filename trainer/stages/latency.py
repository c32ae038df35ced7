"""`wellread latency --model M --out FILE`: CPU inference latency of a sequence classifier, for a study's
size/speed trade-off (the Well-Read students are chosen for cheap inference, so the report states the cost).

The classifier is built by the loader fine-tuning uses (`trainer.models.classify.load_classifier`: a preset
gets random weights, which time the same as trained ones) and run through `Classifier.logits`, the forward of
wellread's own prediction: fp32, eval mode, `torch.inference_mode`, full-length inputs (every attention mask
entry 1). Each batch size gets `--warmup` untimed forwards, then `--repeats` forwards timed one by one with
`time.perf_counter`; the median and the 90th percentile are reported (the median resists a stray slow
forward, the p90 shows how stray they are).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError
from trainer.fileio import atomic_write_json
from trainer.models.classify import Classifier, load_classifier


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (random weights), model directory, run or checkpoint")
    p.add_argument("--out", required=True, help="write the latency JSON here")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example (all real: no padding)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current setting)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per batch size")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per batch size")
    p.add_argument("--num-labels", type=int, default=2, help="classes of the head (its size counts in params)")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for values that would time nothing or divide by zero."""
    for name in ("seq_len", "repeats", "num_labels"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if any(b < 1 for b in args.batch_sizes):
        raise UserError(f"--batch-sizes must be positive, got {' '.join(map(str, args.batch_sizes))}")


def time_batch(model: Classifier, inputs: dict[str, torch.Tensor], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` forwards, after `warmup` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            model.logits(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.logits(**inputs)
            times.append(time.perf_counter() - start)
    return times


def measure(model: Classifier, batch: int, seq_len: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 milliseconds per batch of `batch` full-length random sequences, and per example."""
    vocab = model.hf.config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    inputs = {
        "input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq_len, dtype=torch.long),
    }
    ms = [1000.0 * t for t in time_batch(model, inputs, warmup, repeats)]
    median = statistics.median(ms)
    return {
        "ms_per_batch": median,
        "ms_per_batch_p90": float(np.percentile(ms, 90)),
        "ms_per_example": median / batch,
    }


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    hf = load_classifier(args.model, args.num_labels)
    max_position = hf.config.max_position_embeddings
    if args.seq_len > max_position:
        raise UserError(f"--seq-len {args.seq_len}: {args.model} has {max_position} positions at most")
    model = Classifier(hf.float()).eval()
    before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        threads = torch.get_num_threads()
        batches = {str(b): measure(model, b, args.seq_len, args.warmup, args.repeats) for b in args.batch_sizes}
    finally:
        torch.set_num_threads(before)  # a caller in the same process keeps its own setting
    bad = [b for b, row in batches.items() if not all(math.isfinite(v) and v > 0 for v in row.values())]
    if bad:
        raise RuntimeError(f"non-positive or non-finite timing at batch {bad[0]}: {batches[bad[0]]}")
    result = {
        "model": args.model,
        "params": sum(p.numel() for p in hf.parameters()),
        "seq_len": args.seq_len,
        "threads": threads,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "batches": batches,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0
