"""Masked-token loss and accuracy on held-out text, with fixed masks so numbers compare across runs.

`wellread evaluate-mlm --model DIR --data ...`; the evaluation itself (also the eval step of `wellread pretrain`
and of DistilBERT distillation) is `trainer.models.mlm.evaluate_mlm`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import BertForMaskedLM

from trainer.data.indexed import MANIFEST, TokenShards
from trainer.data.masking import MaskSpec
from trainer.data.preprocess import PackOptions, preprocess
from trainer.data.text_sources import SourceSpec
from trainer.data.tokenization import load_tokenizer, special_ids, tokenizer_hash
from trainer.errors import UserError
from trainer.fileio import atomic_write_json
from trainer.launcher import DistEnv
from trainer.models.mlm import SparseMLM, evaluate_mlm


def _model_dir(path: Path) -> Path:
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"{path}: no config.json (give an exported model directory or a run directory)")


def _corpus(data: list[str], model_dir: Path, seq_len: int, workdir: Path) -> TokenShards:
    if len(data) == 1 and (Path(data[0]) / MANIFEST).is_file():
        return TokenShards(data[0])

    files = [Path(p) for p in data]
    wikitext = any("wiki" in p.name and ".tokens" in p.name for p in files)
    spec = SourceSpec(files=files, wikitext=wikitext)
    preprocess(spec, workdir / "corpus", str(model_dir), PackOptions(seq_len=seq_len), progress=False)
    return TokenShards(workdir / "corpus")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported HF directory or a checkpoint directory")
    p.add_argument(
        "--data", required=True, nargs="+", help="a preprocessed shard directory, or text files (tokenized on the fly)"
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234, help="seed of the (fixed) evaluation masks")
    p.add_argument("--max-sequences", type=int, default=None)
    p.add_argument("--out", default=None, help="write metrics JSON here")


def measure(
    model_dir: Path, data: list[str], seq_len: int, batch_size: int, max_sequences: int | None, seed: int
) -> dict[str, float]:
    """The evaluation of `wellread evaluate-mlm`, callable by other stages (`wellread export` records it), so
    that a number a stage writes is the number this command prints for the same model and data."""
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(data, model_dir, seq_len, Path(tmp))
        if corpus.tokenizer_hash != tokenizer_hash(tok):
            raise UserError(f"{data[0]}: tokenized with another tokenizer than the model's ({model_dir})")
        # fp32 whatever the file holds: a float16 export is measured with its (rounded) weights, not in fp16
        hf = BertForMaskedLM.from_pretrained(model_dir, dtype=torch.float32)
        spec = MaskSpec(vocab_size=hf.config.vocab_size, specials=special_ids(tok))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        return evaluate_mlm(SparseMLM(hf), corpus, spec, DistEnv(), batch_size, max_sequences, seed)


def main(args: argparse.Namespace) -> int:
    model_dir = _model_dir(Path(args.model))
    metrics = measure(model_dir, args.data, args.seq_len, args.batch_size, args.max_sequences, args.seed)
    metrics = {"model": str(model_dir), "data": args.data, "seq_len": args.seq_len, "seed": args.seed, **metrics}
    print(json.dumps(metrics, indent=2))
    if args.out:
        atomic_write_json(args.out, metrics)
    return 0
