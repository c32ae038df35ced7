"""Memory-mapped token shards (after Megatron-LM's indexed_dataset).

A corpus is a directory::

    tokenizer.json       the tokenizer that made the ids (so the corpus is self-contained)
    manifest.json        written last: format version, tokenizer hash, options, sources, and per shard
                         the sha256 of both files, token/sequence/document counts
    shard-00000.bin      one record (trainer/data/binfile.py): the token ids of all sequences back to
                         back, `binfile.token_dtype` (uint16 up to 65,536 entries, else uint32)
    shard-00000.idx      two records (trainer/data/binfile.py), both uint64:
                           seq_off  [n_seqs + 1]  token offset of sequence i in .bin; seq i is
                                                  bin[seq_off[i]:seq_off[i + 1]]
                           doc_off  [n_docs + 1]  index of the first sequence of document j
    shard-00000.json     sidecar written after both files: their sha256 and the range of source
                         documents inside, so an interrupted run resumes at the next shard

Every sequence is `[CLS] tokens [SEP]` (or `[CLS] doc [SEP] doc [SEP]` when short documents are
merged), at most seq_len ids, and never splits a document it does not have to. Version 2 put the
shared binfile header on both files; version 1 corpora are refused (re-run preprocessing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.binfile import VectorWriter, read_array, read_arrays, read_manifest, token_dtype, write_arrays
from trainer.data.tokenization import load_tokenizer, tokenizer_hash
from trainer.errors import UserError
from trainer.fileio import atomic_write_json, sha256_file

__all__ = [
    "FORMAT_NAME",
    "MANIFEST",
    "TOKENIZER_FILE",
    "VERSION",
    "Shard",
    "ShardWriter",
    "TokenShards",
    "open_shard",
    "shard_stem",
    "token_dtype",
]

MAGIC = b"WRIDX\x00\x00\x01"  # unchanged since version 1, so a version-1 .idx gets the version message
VERSION = 2
REBUILD = "re-run tools/preprocess_corpus.py into a new directory"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # a copy of the tokenizer, so a corpus directory is self-contained
FORMAT_NAME = "wellread-token-shards"


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


class ShardWriter:
    """Streams sequences of one shard to temp files; `close()` publishes .bin, .idx, then the sidecar."""

    def __init__(self, directory: Path, index: int, dtype: np.dtype):
        self.directory = Path(directory)
        self.stem = shard_stem(index)
        self.dtype = np.dtype(dtype)
        self.bin_path = self.directory / f"{self.stem}.bin"
        self.idx_path = self.directory / f"{self.stem}.idx"
        self._bin = VectorWriter(self.bin_path, self.dtype, MAGIC, VERSION)
        self.seq_off: list[int] = [0]
        self.doc_off: list[int] = []
        self.tokens = 0

    def start_document(self) -> None:
        self.doc_off.append(len(self.seq_off) - 1)

    def add_sequence(self, ids: np.ndarray) -> None:
        self._bin.append(ids)
        self.tokens += np.size(ids)
        self.seq_off.append(self.tokens)

    @property
    def n_seqs(self) -> int:
        return len(self.seq_off) - 1

    def close(self, extra: dict) -> dict:
        """Publish both files (each fsynced and renamed), then the sidecar that marks the shard finished."""
        self._bin.close()
        doc_off = self.doc_off + [self.n_seqs]
        write_arrays(
            self.idx_path, [np.asarray(self.seq_off, dtype="<u8"), np.asarray(doc_off, dtype="<u8")], MAGIC, VERSION
        )
        info = {
            "name": self.stem,
            "version": VERSION,
            "bin": self.bin_path.name,
            "idx": self.idx_path.name,
            "bin_sha256": sha256_file(self.bin_path),
            "idx_sha256": sha256_file(self.idx_path),
            "tokens": self.tokens,
            "sequences": self.n_seqs,
            "documents": len(self.doc_off),
            **extra,
        }
        atomic_write_json(self.directory / f"{self.stem}.json", info)
        return info

    def abort(self) -> None:
        self._bin.abort()


@dataclass
class Shard:
    name: str
    tokens: np.ndarray
    seq_off: np.ndarray
    doc_off: np.ndarray

    def __len__(self) -> int:
        return len(self.seq_off) - 1

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.seq_off[i] : self.seq_off[i + 1]]


def open_shard(bin_path: Path, idx_path: Path) -> Shard:
    """Memory-map one shard; validates headers, sizes and that the offsets agree, never reads the tokens."""
    what = "wellread corpus shard"
    seq_off, doc_off = read_arrays(idx_path, MAGIC, VERSION, what, records=2, hint=REBUILD)
    tokens = read_array(bin_path, MAGIC, VERSION, what, hint=REBUILD)
    for name, arr in (("sequence", seq_off), ("document", doc_off)):
        if arr.dtype != np.dtype("<u8") or arr.ndim != 1 or arr.size == 0:
            raise UserError(f"{idx_path}: {name} offsets must be a non-empty uint64 vector")
    if tokens.ndim != 1 or tokens.dtype.str not in ("<u2", "<u4"):
        raise UserError(f"{bin_path}: tokens must be a uint16/uint32 vector, got {tokens.dtype.str} {tokens.shape}")
    if int(seq_off[0]) != 0 or int(seq_off[-1]) != tokens.size:
        raise UserError(
            f"{idx_path}: sequence offsets span {int(seq_off[0])}..{int(seq_off[-1])}, the .bin holds "
            f"{tokens.size} tokens"
        )
    if int(doc_off[-1]) != seq_off.size - 1:
        raise UserError(
            f"{idx_path}: document offsets end at {int(doc_off[-1])}, the shard has {seq_off.size - 1} sequences"
        )
    return Shard(bin_path.stem, tokens, seq_off, doc_off)


class TokenShards:
    """Random access to the sequences of a preprocessed corpus without loading it into memory.

    `verify="full"` checks every file's sha256 against the manifest (reports the shard by name),
    `"size"` checks sizes and headers only (for very large corpora already verified once).
    """

    def __init__(self, directory: str | Path, verify: str = "full"):
        self.directory = Path(directory)
        self.manifest = read_manifest(
            self.directory / MANIFEST,
            FORMAT_NAME,
            VERSION,
            "preprocessed corpus",
            "preprocessing did not finish: re-run tools/preprocess_corpus.py to resume",
            REBUILD,
        )
        self.shards: list[Shard] = []
        for entry in self.manifest["shards"]:
            bin_path, idx_path = self.directory / entry["bin"], self.directory / entry["idx"]
            for path in (bin_path, idx_path):
                if not path.is_file():
                    raise UserError(f"{path}: shard file listed in {MANIFEST} is missing")
            if verify == "full":
                for path, key in ((bin_path, "bin_sha256"), (idx_path, "idx_sha256")):
                    digest = sha256_file(path)
                    if digest != entry[key]:
                        raise UserError(
                            f"{path}: checksum mismatch in shard {entry['name']} (sha256 {digest[:12]}.. "
                            f"!= manifest {entry[key][:12]}..): the file is corrupt"
                        )
            shard = open_shard(bin_path, idx_path)
            if len(shard) != entry["sequences"] or int(shard.seq_off[-1]) != entry["tokens"]:
                raise UserError(f"{idx_path}: counts disagree with {MANIFEST} for shard {entry['name']}")
            self.shards.append(shard)
        self.cum = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.cum[-1])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["options"]["seq_len"])

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def tokenizer(self):
        """The tokenizer that produced the ids, checked against the manifest's fingerprint."""
        tok = load_tokenizer(self.directory / TOKENIZER_FILE)
        if tokenizer_hash(tok) != self.tokenizer_hash:
            raise UserError(f"{self.directory / TOKENIZER_FILE}: does not match the tokenizer hash in {MANIFEST}")
        return tok

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.cum, index, side="right")) - 1
        return shard, index - int(self.cum[shard])

    def __getitem__(self, index: int) -> np.ndarray:
        shard, local = self.locate(int(index))
        return self.shards[shard].sequence(local)

    def lengths(self) -> np.ndarray:
        return (
            np.concatenate([np.diff(np.asarray(s.seq_off)) for s in self.shards])
            if self.shards
            else np.zeros(0, dtype=np.int64)
        )

    def documents(self):
        """Yield each document as the list of its sequences (round trips and inspection)."""
        for shard in self.shards:
            for j in range(len(shard.doc_off) - 1):
                yield [shard.sequence(i) for i in range(int(shard.doc_off[j]), int(shard.doc_off[j + 1]))]
