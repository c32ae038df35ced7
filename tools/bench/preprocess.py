#!/usr/bin/env python
"""Preprocessing throughput and peak memory: wellread vs the usual Hugging Face recipe, in one run.

Baseline = transformers' run_mlm.py approach: `datasets.load_dataset("text")`, `.map(tokenizer, batched=True,
num_proc=N)` with the same fast tokenizer, then `.map(group_texts)` concatenating into seq_len blocks.
Both read the same plain-text copy of the corpus (Gutenberg headers stripped once, up front), with the
same number of worker processes. Peak memory = the largest summed RSS of the whole process tree,
sampled every 20 ms. Flatness: wellread is also run on 4 copies of the corpus.

    python tools/bench/preprocess.py --corpus ../shared/data/gutenberg/books --workers 1 2 --out bench-preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]

HF_SCRIPT = r"""
import sys, json, time
from itertools import chain
from pathlib import Path
import datasets
from transformers import AutoTokenizer
files, tok_dir, cache = sys.argv[1].split(","), sys.argv[2], sys.argv[5]
seq_len, nproc = int(sys.argv[3]), int(sys.argv[4])
datasets.disable_progress_bars()
t = time.time()
raw = datasets.load_dataset("text", data_files={"train": files}, cache_dir=cache, split="train")
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
def tokenize_function(examples):
    return tokenizer(examples["text"], return_special_tokens_mask=True)
tokenized = raw.map(tokenize_function, batched=True, num_proc=nproc if nproc > 1 else None, remove_columns=["text"])
def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total = len(concatenated[list(examples.keys())[0]])
    total = (total // seq_len) * seq_len
    return {k: [v[i:i + seq_len] for i in range(0, total, seq_len)] for k, v in concatenated.items()}
grouped = tokenized.map(group_texts, batched=True, num_proc=nproc if nproc > 1 else None)
print(json.dumps({"tokens": len(grouped) * seq_len, "sequences": len(grouped), "seconds": time.time() - t}))
"""


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """-> (wall seconds, peak summed RSS of the process tree in MiB, stdout)."""
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )
    peak = 0.0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return time.time() - t0, peak, out


def plain_copy(books: list[Path], dest: Path, copies: int) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from trainer.data.text_sources import SourceStats, open_text, strip_gutenberg

    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for book in books:
        with open_text(book, SourceStats()) as f:
            text = "".join(strip_gutenberg(f, book, SourceStats()))
        for c in range(copies):
            path = dest / f"{book.name.split('.')[0]}-{c}.txt"
            path.write_text(text)
            files.append(path)
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared/data/gutenberg/books")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("bench-preprocess.json"))
    args = p.parse_args()
    books = sorted(args.corpus.glob("*.txt*"))
    if not books:
        raise SystemExit(f"{args.corpus}: no books found")
    from trainer.models.zoo import minilm_dir

    results = {"corpus": str(args.corpus), "books": len(books), "seq_len": args.seq_len, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = plain_copy(books, tmp / "x1", 1)
        four = plain_copy(books, tmp / "x4", 4)
        results["input_mb_1x"] = sum(f.stat().st_size for f in one) / 2**20
        for workers in args.workers:
            row = {"workers": workers}
            for label, files in (("1x", one), ("4x", four)):
                out = tmp / f"ours-{workers}-{label}"
                secs, peak, _ = measure(
                    [
                        sys.executable,
                        "tools/preprocess_corpus.py",
                        *map(str, files),
                        "--out",
                        str(out),
                        "--seq-len",
                        str(args.seq_len),
                        "--workers",
                        str(workers),
                        "--no-progress",
                    ]
                )
                tokens = json.loads((out / "manifest.json").read_text())["stats"]["tokens"]
                row[f"ours_{label}"] = {
                    "seconds": secs,
                    "tokens": tokens,
                    "tokens_per_s": tokens / secs,
                    "peak_rss_mb": peak,
                }
            secs, peak, out = measure(
                [
                    sys.executable,
                    "-c",
                    HF_SCRIPT,
                    ",".join(map(str, one)),
                    str(minilm_dir()),
                    str(args.seq_len),
                    str(workers),
                    str(tmp / f"hf-cache-{workers}"),
                ]
            )
            hf = json.loads(out.strip().splitlines()[-1])
            row["hf_1x"] = {
                "seconds": secs,
                "tokens": hf["tokens"],
                "tokens_per_s": hf["tokens"] / secs,
                "peak_rss_mb": peak,
            }
            row["speedup_tokens_per_s"] = row["ours_1x"]["tokens_per_s"] / row["hf_1x"]["tokens_per_s"]
            row["ours_peak_4x_over_1x"] = row["ours_4x"]["peak_rss_mb"] / row["ours_1x"]["peak_rss_mb"]
            row["peak_rss_hf_over_ours"] = row["hf_1x"]["peak_rss_mb"] / row["ours_1x"]["peak_rss_mb"]
            results["runs"].append(row)
            print(
                f"workers={workers}: ours {row['ours_1x']['tokens_per_s']:,.0f} tok/s "
                f"(peak {row['ours_1x']['peak_rss_mb']:.0f} MiB; 4x corpus {row['ours_4x']['peak_rss_mb']:.0f} MiB, "
                f"ratio {row['ours_peak_4x_over_1x']:.2f}) | HF datasets.map+group_texts "
                f"{row['hf_1x']['tokens_per_s']:,.0f} tok/s (peak {row['hf_1x']['peak_rss_mb']:.0f} MiB) | "
                f"speedup {row['speedup_tokens_per_s']:.2f}x",
                flush=True,
            )
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
