#!/usr/bin/env python
"""Train an uncased WordPiece tokenizer (BERT-style) on text files with `tokenizers`.

    python tools/train_tokenizer.py corpus/*.txt --vocab-size 30522 --out my-tokenizer/

Writes tokenizer.json and vocab.txt; pass the directory as `--tokenizer` to preprocessing and recipes.
Most users keep the default uncased BERT vocab (no need to run this). The directory appears complete or
not at all: both files are written into a temporary directory beside it, fsynced, then renamed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from trainer.data.text_sources import SourceSpec, SourceStats, iter_pieces
from trainer.data.tokenization import SPECIALS
from trainer.errors import UserError
from trainer.fileio import atomic_rename_dir, fsync_dir, tmp_name
from trainer.registry import run_main


def publish_dir(out: Path, write) -> None:
    """Call write(tmp_dir), fsync what it wrote, then rename tmp_dir to `out` (absent or empty: rename(2)
    replaces an empty directory). Killed at any point, `out` is untouched; the temp dir is removed on error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            atomic_rename_dir(tmp, out)
        except OSError as e:  # something appeared in `out` meanwhile: never overwritten
            raise UserError(f"{out}: directory is not empty (nothing was overwritten): {e.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="text or JSONL files (plain or .gz)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    p.add_argument("--strip-gutenberg", action="store_true")
    p.add_argument("--text-field", default="text")
    args = p.parse_args(argv)

    from tokenizers.implementations import BertWordPieceTokenizer

    spec = SourceSpec(files=args.inputs, strip_gutenberg=args.strip_gutenberg, text_field=args.text_field)
    tok = BertWordPieceTokenizer(lowercase=not args.cased, strip_accents=not args.cased)
    texts = (piece for _, piece in iter_pieces(spec, SourceStats()))
    tok.train_from_iterator(
        texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency, special_tokens=list(SPECIALS)
    )
    if tok.get_vocab_size() <= len(SPECIALS):
        raise UserError(f"no text found in {', '.join(map(str, args.inputs))}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UserError(f"{args.out}: directory is not empty (nothing was overwritten)")

    def write(directory: Path) -> None:
        tok.save(str(directory / "tokenizer.json"))
        tok.save_model(str(directory))

    publish_dir(args.out, write)
    print(f"{args.out}: vocab {tok.get_vocab_size()} (tokenizer.json, vocab.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
