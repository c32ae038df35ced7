"""Memory-mapped token shards (after Megatron-LM's indexed_dataset).

A corpus is a directory::

    tokenizer.json       the tokenizer that made the ids (so the corpus is self-contained)
    manifest.json        written last: tokenizer hash, options, sources, and per shard the sha256 of
                         both files, token/sequence/document counts
    shard-00000.bin      token ids of all sequences back to back; uint16 when the vocab has at most
                         65,536 entries, else uint32; little endian
    shard-00000.idx      32-byte header, then two offset tables (all little endian):
                           magic     8 bytes  b"WRIDX\\x00\\x00\\x01"
                           version   u32      1
                           itemsize  u32      2 (uint16) or 4 (uint32): dtype of the .bin
                           n_seqs    u64
                           n_docs    u64
                           seq_off   u64[n_seqs + 1]  token offset of sequence i in .bin; seq i is
                                                      bin[seq_off[i]:seq_off[i + 1]]
                           doc_off   u64[n_docs + 1]  index of the first sequence of document j
    shard-00000.json     sidecar written after both files: their sha256 and the range of source
                         documents inside, so an interrupted run resumes at the next shard

Every sequence is `[CLS] tokens [SEP]` (or `[CLS] doc [SEP] doc [SEP]` when short documents are
merged), at most seq_len ids, and never splits a document it does not have to.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import UserError
from trainer.fileio import atomic_write_json, fsync_dir, read_json, sha256_file, tmp_name

MAGIC = b"WRIDX\x00\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # a copy of the tokenizer, so a corpus directory is self-contained
FORMAT_NAME = "wellread-token-shards"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


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
        self._bin_tmp = tmp_name(self.bin_path)
        self._bin = open(self._bin_tmp, "wb")
        self.seq_off: list[int] = [0]
        self.doc_off: list[int] = []
        self.tokens = 0

    def start_document(self) -> None:
        self.doc_off.append(len(self.seq_off) - 1)

    def add_sequence(self, ids: np.ndarray) -> None:
        arr = np.ascontiguousarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes())
        self.tokens += arr.size
        self.seq_off.append(self.tokens)

    @property
    def n_seqs(self) -> int:
        return len(self.seq_off) - 1

    def close(self, extra: dict) -> dict:
        """Fsync and rename both files, then write the sidecar that marks the shard finished."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(self._bin_tmp, self.bin_path)
        doc_off = self.doc_off + [self.n_seqs]
        header = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.n_seqs, len(self.doc_off))
        idx_tmp = tmp_name(self.idx_path)
        with open(idx_tmp, "wb") as f:
            f.write(header)
            f.write(np.asarray(self.seq_off, dtype="<u8").tobytes())
            f.write(np.asarray(doc_off, dtype="<u8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(idx_tmp, self.idx_path)
        fsync_dir(self.directory)
        info = {
            "name": self.stem,
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
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)


@dataclass
class Shard:
    name: str
    tokens: np.ndarray
    seq_off: np.ndarray
    doc_off: np.ndarray

    def __len__(self) -> int:
        return len(self.seq_off) - 1

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.seq_off[i]:self.seq_off[i + 1]]


def open_shard(bin_path: Path, idx_path: Path) -> Shard:
    """Memory-map one shard; validates the header and offsets, never reads the tokens."""
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UserError(f"{idx_path}: truncated index header")
    magic, version, itemsize, n_seqs, n_docs = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise UserError(f"{idx_path}: not a wellread shard index (bad magic or version)")
    if itemsize not in (2, 4):
        raise UserError(f"{idx_path}: unsupported token size {itemsize}")
    expected = HEADER.size + 8 * (n_seqs + 1) + 8 * (n_docs + 1)
    if idx_path.stat().st_size != expected:
        raise UserError(f"{idx_path}: index size {idx_path.stat().st_size} != expected {expected}")
    seq_off = np.memmap(idx_path, dtype="<u8", mode="r", offset=HEADER.size, shape=(n_seqs + 1,))
    doc_off = np.memmap(idx_path, dtype="<u8", mode="r", offset=HEADER.size + 8 * (n_seqs + 1),
                        shape=(n_docs + 1,))
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    n_tokens = int(seq_off[-1])
    if bin_path.stat().st_size != n_tokens * itemsize:
        raise UserError(f"{bin_path}: size {bin_path.stat().st_size} bytes != {n_tokens} tokens x {itemsize}")
    tokens = (np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens
              else np.zeros(0, dtype=dtype))
    return Shard(bin_path.stem, tokens, seq_off, doc_off)


class TokenShards:
    """Random access to the sequences of a preprocessed corpus without loading it into memory.

    `verify="full"` checks every file's sha256 against the manifest (reports the shard by name),
    `"size"` checks sizes and headers only (for very large corpora already verified once).
    """

    def __init__(self, directory: str | Path, verify: str = "full"):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{self.directory}: no {MANIFEST} (not a preprocessed corpus, or preprocessing "
                            "did not finish: re-run tools/preprocess_corpus.py to resume)")
        self.manifest = read_json(manifest_path, "corpus manifest")
        if self.manifest.get("format") != FORMAT_NAME:
            raise UserError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
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
                        raise UserError(f"{path}: checksum mismatch in shard {entry['name']} (sha256 {digest[:12]}.. "
                                        f"!= manifest {entry[key][:12]}..): the file is corrupt")
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
        from trainer.data.tokenization import load_tokenizer, tokenizer_hash

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
        return np.concatenate([np.diff(np.asarray(s.seq_off)) for s in self.shards]) if self.shards \
            else np.zeros(0, dtype=np.int64)

    def documents(self):
        """Yield each document as the list of its sequences (round trips and inspection)."""
        for shard in self.shards:
            for j in range(len(shard.doc_off) - 1):
                yield [shard.sequence(i) for i in range(int(shard.doc_off[j]), int(shard.doc_off[j + 1]))]
