#!/usr/bin/env python
"""Tokenize a corpus into memory-mapped token shards: the script form of `wellread preprocess`
(trainer/stages/preprocess.py; layout: trainer/data/indexed.py).

    python tools/preprocess_corpus.py ../shared/data/gutenberg/books/*.txt.gz --strip-gutenberg \
        --out data/gutenberg-128 --seq-len 128 --workers 2

Re-running the same command resumes after the last finished shard.

Many jobs at once (trainer/data/corpus_parts.py; slurm/preprocess.sbatch does this as a job array):

    python tools/preprocess_corpus.py FILES... --out OUT --task-index i --num-tasks n   (or --slurm-array)

Task i tokenizes its contiguous share of the files into OUT/parts/; the last task to finish merges the parts
into OUT (every part verified, shards renamed in order, one manifest with every shard's checksum). `--merge`
(with the same FILES, options and --num-tasks) merges by hand, e.g. if the merging task died. With the default
--packing strict the merged corpus has the same sequences in the same order as one process over all files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.registry import run_main
from trainer.stages.preprocess import add_arguments
from trainer.stages.preprocess import main as preprocess_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return preprocess_main(parse_args(argv), command=[Path(sys.argv[0]).name, *argv])


if __name__ == "__main__":
    sys.exit(run_main(main))
