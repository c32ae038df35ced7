"""`wellread preprocess FILES... --out DIR`: tokenize a corpus into memory-mapped token shards for
`wellread pretrain` (layout: trainer/data/indexed.py).

    wellread preprocess ../shared/data/gutenberg/books/*.txt.gz --strip-gutenberg \
        --out data/gutenberg-128 --seq-len 128 --workers 2

Re-running the same command resumes after the last finished shard.

Many jobs at once (trainer/data/corpus_parts.py; slurm/preprocess.sbatch does this as a job array):

    wellread preprocess FILES... --out OUT --task-index i --num-tasks n   (or --slurm-array)

Task i tokenizes its contiguous share of the files into OUT/parts/; the last task to finish merges the parts
into OUT (every part verified, shards renamed in order, one manifest with every shard's checksum). `--merge`
(with the same FILES, options and --num-tasks) merges by hand, e.g. if the merging task died. With the default
--packing strict the merged corpus has the same sequences in the same order as one process over all files.
`tools/preprocess_corpus.py` is the same command for those who call the script.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.data import corpus_parts as cp
from trainer.data.preprocess import PackOptions, preprocess
from trainer.data.text_sources import SourceSpec
from trainer.errors import UserError
from trainer.runlock import RunLock


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        help="text files (plain or .gz) and/or JSONL files (.jsonl/.json[.gz], one record per document)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory for shards + manifest.json")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json, vocab.txt or a directory with one (default: uncased BERT WordPiece)",
    )
    p.add_argument("--seq-len", type=int, default=128, help="sequence length including [CLS] and [SEP]")
    p.add_argument("--shard-tokens", type=int, default=16_000_000, help="tokens per shard (closed at a document end)")
    p.add_argument(
        "--packing",
        choices=["strict", "merge"],
        default="strict",
        help="strict: a sequence never holds two documents; merge: short documents share sequences",
    )
    p.add_argument(
        "--doc-mode",
        choices=["file", "blank_line", "line"],
        default="file",
        help="what a document is inside a text file",
    )
    p.add_argument("--text-field", default="text", help="text field of JSONL records / dataset rows")
    p.add_argument("--strip-gutenberg", action="store_true", help="keep only the text between the PG markers")
    p.add_argument("--wikitext", action="store_true", help="undo WikiText's ' @-@ ' style; <unk> -> [UNK] (unmasked)")
    p.add_argument("--hf-dataset", default=None, help="a `datasets` dataset name (hub) or local data files/dir")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-split", default="train")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--task-index", type=int, default=None, help="this task's share of the input files (0-based)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of tasks sharing the input files")
    p.add_argument(
        "--slurm-array",
        action="store_true",
        help="--task-index/--num-tasks from this job's position in its Slurm job array",
    )
    p.add_argument("--merge", action="store_true", help="only merge the finished parts of --num-tasks tasks")


def main(args: argparse.Namespace, command: list[str] | None = None) -> int:
    # the argument names are SourceSpec's field names (`inputs` aside)
    fields = ("doc_mode", "text_field", "strip_gutenberg", "wikitext", "hf_dataset", "hf_split", "hf_config")
    spec = SourceSpec(files=list(args.inputs), **{f: getattr(args, f) for f in fields})
    opts = PackOptions(seq_len=args.seq_len, shard_tokens=args.shard_tokens, packing=args.packing, workers=args.workers)
    command = command or ["wellread", "preprocess", *sys.argv[2:]]
    if args.slurm_array or args.num_tasks is not None or args.merge:
        manifest = in_parts(args, spec, opts, command)
        if manifest is None:
            return 0
    else:
        with RunLock(args.out):
            manifest = preprocess(spec, args.out, args.tokenizer, opts, progress=not args.no_progress, command=command)
    s = manifest["stats"]
    print(
        f"{args.out}: {len(manifest['shards'])} shard(s), {s['tokens']:,} tokens, {s['sequences']:,} sequences, "
        f"{s['documents']:,} documents, {s['replaced_invalid_utf8']} invalid UTF-8 sequence(s) replaced"
    )
    return 0


def in_parts(args: argparse.Namespace, spec: SourceSpec, opts: PackOptions, command: list[str]) -> dict | None:
    """This task's share (then the merge, if it finished last), or only the merge; -> the merged manifest or None."""
    if args.slurm_array:
        if args.task_index is not None or args.num_tasks is not None:
            raise UserError("--slurm-array takes --task-index and --num-tasks from the array; give one or the other")
        index, n = cp.array_position(os.environ)
    else:
        index, n = args.task_index, args.num_tasks
        if n is None:
            raise UserError("--task-index and --merge need --num-tasks (or --slurm-array)")
    if args.merge:
        with RunLock(args.out, part="merge"):
            return cp.merge(spec, args.out, args.tokenizer, opts, n, command)
    if index is None:
        raise UserError("--num-tasks needs --task-index (or --slurm-array)")
    with RunLock(args.out, part=f"part-{index}-of-{n}"):  # the parts write side by side; a twin of one is refused
        return part_then_merge(args, spec, opts, command, index, n)


def part_then_merge(
    args: argparse.Namespace, spec: SourceSpec, opts: PackOptions, command: list[str], index: int, n: int
) -> dict | None:
    cp.preprocess_part(spec, args.out, args.tokenizer, opts, index, n, progress=not args.no_progress, command=command)
    waiting = cp.parts_finished(args.out, n)
    if (args.out / cp.MANIFEST).is_file():
        return None
    if waiting:
        print(
            f"{args.out}: part {index} of {n} done; {len(waiting)} part(s) still running (the last one merges)",
            file=sys.stderr,
        )
        return None
    if not cp.claim_merge(args.out, n):
        print(
            f"{args.out}: every part is done; another task is merging (if it died, run this command with --merge)",
            file=sys.stderr,
        )
        return None
    return cp.merge(spec, args.out, args.tokenizer, opts, n, command)
