#!/usr/bin/env python
"""Tokenize a corpus into memory-mapped token shards for `wellread pretrain` (layout: trainer/data/indexed.py).

    python tools/preprocess_corpus.py ../shared/data/gutenberg/books/*.txt.gz --strip-gutenberg \
        --out data/gutenberg-128 --seq-len 128 --workers 2

Re-running the same command resumes after the last finished shard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.cli import run_main
from trainer.data.preprocess import PackOptions, preprocess
from trainer.data.text_sources import SourceSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", type=Path,
                   help="text files (plain or .gz) and/or JSONL files (.jsonl/.json[.gz], one record per document)")
    p.add_argument("--out", type=Path, required=True, help="output directory for shards + manifest.json")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, vocab.txt or a directory with one (default: uncased BERT WordPiece)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length including [CLS] and [SEP]")
    p.add_argument("--shard-tokens", type=int, default=16_000_000, help="tokens per shard (closed at a document end)")
    p.add_argument("--packing", choices=["strict", "merge"], default="strict",
                   help="strict: a sequence never holds two documents; merge: short documents share sequences")
    p.add_argument("--doc-mode", choices=["file", "blank_line", "line"], default="file",
                   help="what a document is inside a text file")
    p.add_argument("--text-field", default="text", help="text field of JSONL records / dataset rows")
    p.add_argument("--strip-gutenberg", action="store_true", help="keep only the text between the PG markers")
    p.add_argument("--wikitext", action="store_true",
                   help="undo WikiText tokenization (' @-@ ' -> '-', ...) and map <unk> to [UNK] (never masked)")
    p.add_argument("--hf-dataset", default=None, help="a `datasets` dataset name (hub) or local data files/dir")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-split", default="train")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = SourceSpec(files=list(args.inputs), doc_mode=args.doc_mode, text_field=args.text_field,
                      strip_gutenberg=args.strip_gutenberg, wikitext=args.wikitext, hf_dataset=args.hf_dataset,
                      hf_split=args.hf_split, hf_config=args.hf_config)
    opts = PackOptions(seq_len=args.seq_len, shard_tokens=args.shard_tokens, packing=args.packing,
                       workers=args.workers)
    manifest = preprocess(spec, args.out, args.tokenizer, opts, progress=not args.no_progress,
                          command=[Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    s = manifest["stats"]
    print(f"{args.out}: {len(manifest['shards'])} shard(s), {s['tokens']:,} tokens, {s['sequences']:,} sequences, "
          f"{s['documents']:,} documents, {s['replaced_invalid_utf8']} invalid UTF-8 sequence(s) replaced")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
