"""Corpus -> memory-mapped token shards (layout in trainer/data/indexed.py).

Streams: documents are read piece by piece, tokenized in a bounded window of batches (in N worker
processes with `workers=N`), packed into `[CLS] ... [SEP]` sequences and written shard by shard, so
peak memory does not grow with the corpus. Shards close only at document boundaries; each finished
shard records the next document index, and a re-run skips the documents of finished shards without
tokenizing them again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from trainer.data.binfile import token_dtype
from trainer.data.indexed import FORMAT_NAME, MANIFEST, REBUILD, TOKENIZER_FILE, VERSION, ShardWriter, shard_stem
from trainer.data.text_sources import SourceSpec, SourceStats, input_bytes, iter_pieces
from trainer.data.tokenization import load_tokenizer, resolve_tokenizer_path, special_ids, tokenizer_hash
from trainer.errors import UserError
from trainer.fileio import atomic_write_bytes, atomic_write_json, read_json, remove_stale_tmp, sha256_file

Packing = Literal["strict", "merge"]


@dataclass
class PackOptions:
    seq_len: int = 128
    shard_tokens: int = 16_000_000
    packing: Packing = "strict"
    workers: int = 1
    batch_chars: int = 1 << 19

    def validate(self) -> None:
        if self.seq_len < 8:
            raise UserError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")


# ---------------------------------------------------------------------------------------------- tokenizing
_worker_tok = None


def _init_worker(tok_json: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer.from_str(tok_json)


def _tokenize(batch: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (doc index per piece, token count per piece, all ids concatenated)."""
    texts = [t for _, t in batch]
    encode = getattr(_worker_tok, "encode_batch_fast", _worker_tok.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)
    return np.fromiter((d for d, _ in batch), dtype=np.int64, count=len(batch)), lengths, flat


def _batches(pieces, batch_chars: int, skip_before: int):
    batch: list[tuple[int, str]] = []
    size = 0
    for doc, text in pieces:
        if doc < skip_before:
            continue
        batch.append((doc, text))
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenized_stream(pieces, tok_json: str, opts: PackOptions, skip_before: int):
    """Yield `(doc, ids)` in input order, with at most 2*workers batches in flight."""
    batches = _batches(pieces, opts.batch_chars, skip_before)
    if opts.workers == 1:
        _init_worker(tok_json)
        for batch in batches:
            yield from _split(_tokenize(batch))
        return
    ctx = mp.get_context("spawn")  # fork after tokenizers' thread pool is used can deadlock
    with ctx.Pool(opts.workers, initializer=_init_worker, initargs=(tok_json,)) as pool:
        window: collections.deque = collections.deque()
        for batch in batches:
            window.append(pool.apply_async(_tokenize, (batch,)))
            if len(window) >= 2 * opts.workers:
                yield from _split(window.popleft().get())
        while window:
            yield from _split(window.popleft().get())


def _split(result: tuple[np.ndarray, np.ndarray, np.ndarray]):
    docs, lengths, flat = result
    ends = np.cumsum(lengths)
    for d, end, n in zip(docs.tolist(), ends.tolist(), lengths.tolist()):
        yield d, flat[end - n : end]


# ---------------------------------------------------------------------------------------------- packing
class Packer:
    """Cuts each document into `[CLS] chunk [SEP]` sequences; with `merge`, short documents and the
    tails of long ones share a sequence (`[CLS] a [SEP] b [SEP]`) instead of being padded."""

    def __init__(self, seq_len: int, cls: int, sep: int, merge: bool):
        self.body = seq_len - 2
        self.seq_len, self.cls, self.sep, self.merge = seq_len, cls, sep, merge
        self.buf: list[np.ndarray] = []
        self.buf_len = 0
        self.open: list[np.ndarray] = []  # merge mode: the sequence being filled
        self.open_len = 0
        self.doc_started = False

    def add(self, writer: ShardWriter, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        self.buf.append(ids)
        self.buf_len += ids.size
        if self.buf_len < self.body:
            return
        if not self.doc_started:  # a long document: its full chunks are sequences of their own
            self.flush_open(writer)
            writer.start_document()
            self.doc_started = True
        data = np.concatenate(self.buf)
        n_full = data.size // self.body
        for i in range(n_full):
            writer.add_sequence(self._wrap(data[i * self.body : (i + 1) * self.body]))
        rest = data[n_full * self.body :]
        self.buf, self.buf_len = ([rest], rest.size) if rest.size else ([], 0)

    def end_document(self, writer: ShardWriter) -> None:
        tail = np.concatenate(self.buf) if self.buf else np.zeros(0, dtype=np.uint32)
        self.buf, self.buf_len = [], 0
        started, self.doc_started = self.doc_started, False
        if tail.size == 0:
            return
        if not self.merge:
            if not started:
                writer.start_document()
            writer.add_sequence(self._wrap(tail))
            return
        if self.open_len and self.open_len + tail.size + 1 > self.seq_len:
            self.flush_open(writer)
        if not started:
            writer.start_document()  # its first token lands in the open sequence, the next one written
        if not self.open:
            self.open, self.open_len = [np.array([self.cls], dtype=np.uint32)], 1
        self.open += [tail, np.array([self.sep], dtype=np.uint32)]
        self.open_len += tail.size + 1

    def flush_open(self, writer: ShardWriter) -> None:
        if self.open:
            writer.add_sequence(np.concatenate(self.open))
            self.open, self.open_len = [], 0

    def _wrap(self, chunk: np.ndarray) -> np.ndarray:
        out = np.empty(chunk.size + 2, dtype=np.uint32)
        out[0], out[1:-1], out[-1] = self.cls, chunk, self.sep
        return out


# ---------------------------------------------------------------------------------------------- driver
def run_fingerprint(spec: SourceSpec, opts: PackOptions, tok_hash: str) -> str:
    """What must be equal for finished shards to be reused by a re-run."""
    key = {
        "tokenizer": tok_hash,
        "seq_len": opts.seq_len,
        "shard_tokens": opts.shard_tokens,
        "packing": opts.packing,
        "doc_mode": spec.doc_mode,
        "text_field": spec.text_field,
        "strip_gutenberg": spec.strip_gutenberg,
        "wikitext": spec.wikitext,
        "files": [[str(p), p.stat().st_size] for p in spec.files],
        "hf_dataset": [spec.hf_dataset, spec.hf_config, spec.hf_split],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def finished_shards(out: Path, fingerprint: str) -> list[dict]:
    """Sidecars of the leading run of intact shards written with the same fingerprint."""
    done = []
    for index in range(sys.maxsize):
        sidecar = out / f"{shard_stem(index)}.json"
        if not sidecar.is_file():
            break
        info = read_json(sidecar, "shard sidecar")
        if info.get("version", 1) != VERSION:
            raise UserError(
                f"{sidecar}: shard of corpus format version {info.get('version', 1)}, this wellread "
                f"writes version {VERSION}; {REBUILD} (nothing was overwritten)"
            )
        if info.get("fingerprint") != fingerprint:
            raise UserError(
                f"{sidecar}: written with other inputs or options; use a new output directory (nothing was overwritten)"
            )
        intact = all(
            (out / info[k]).is_file() and sha256_file(out / info[k]) == info[f"{k}_sha256"] for k in ("bin", "idx")
        )
        if not intact:
            break
        done.append(info)
    for stale in out.glob("shard-*.json"):  # after a gap or a corrupt shard: redo from there
        if int(stale.stem.split("-")[1]) >= len(done):
            stale.unlink()
    return done


def preprocess(
    spec: SourceSpec,
    out: Path,
    tokenizer: str | None = None,
    opts: PackOptions | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> dict:
    opts = opts or PackOptions()
    opts.validate()
    if not spec.files and not spec.hf_dataset:
        raise UserError("no input given (files or --hf-dataset)")
    tok_path = resolve_tokenizer_path(tokenizer)
    tok = load_tokenizer(tok_path)
    specials = special_ids(tok, tok_path)
    tok_hash = tokenizer_hash(tok)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    for p in spec.files:
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
    fingerprint = run_fingerprint(spec, opts, tok_hash)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        existing = read_json(manifest_path, "corpus manifest")
        if existing.get("version") != VERSION:
            raise UserError(
                f"{manifest_path}: a corpus of format version {existing.get('version')}, this wellread "
                f"writes version {VERSION}; {REBUILD} (nothing was overwritten)"
            )
        if existing.get("fingerprint") == fingerprint:
            print(f"{out}: already complete ({existing['stats']['tokens']:,} tokens); nothing to do", file=sys.stderr)
            return existing
        raise UserError(
            f"{manifest_path}: the directory holds a finished corpus made from other inputs or "
            "options; choose a new output directory (nothing was overwritten)"
        )
    remove_stale_tmp(out)
    shards = finished_shards(out, fingerprint)
    resume_doc = shards[-1]["doc_end"] if shards else 0
    if shards:
        print(f"resuming after {len(shards)} finished shard(s), at document {resume_doc}", file=sys.stderr)

    stats = SourceStats()
    total_bytes = input_bytes(spec)
    bar = _progress_bar(total_bytes, progress)
    t0 = time.time()
    new_tokens = 0
    writer = ShardWriter(out, len(shards), dtype)
    packer = Packer(opts.seq_len, specials.cls, specials.sep, merge=opts.packing == "merge")
    current = -1
    first_doc = resume_doc

    def close_shard(doc_end: int) -> None:
        nonlocal writer, first_doc
        packer.flush_open(writer)
        shards.append(writer.close({"doc_start": first_doc, "doc_end": doc_end, "fingerprint": fingerprint}))
        writer = ShardWriter(out, len(shards), dtype)
        first_doc = doc_end

    try:
        pieces = iter_pieces(spec, stats)
        for doc, ids in tokenized_stream(pieces, tok.to_str(), opts, resume_doc):
            if doc != current:
                if current >= 0:
                    packer.end_document(writer)
                    if writer.tokens + packer.open_len >= opts.shard_tokens:
                        close_shard(current + 1)
                current = doc
            packer.add(writer, ids)
            new_tokens += ids.size
            if bar is not None:
                bar.n = stats.bytes_read
                bar.set_postfix_str(f"{new_tokens / max(time.time() - t0, 1e-9):,.0f} tok/s", refresh=False)
                bar.update(0)
        if current >= 0:
            packer.end_document(writer)
        packer.flush_open(writer)
        if writer.n_seqs:
            close_shard(current + 1)
        else:
            writer.abort()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    if not shards or sum(s["tokens"] for s in shards) == 0:
        raise UserError("no text found in the inputs: " + (", ".join(map(str, spec.files)) or str(spec.hf_dataset)))

    manifest = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "fingerprint": fingerprint,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "source": str(tok_path),
            "sha256": tok_hash,
            "vocab_size": vocab,
            "special_ids": asdict(specials),
        },
        "options": {
            **asdict(opts),
            "doc_mode": spec.doc_mode,
            "text_field": spec.text_field,
            "strip_gutenberg": spec.strip_gutenberg,
            "wikitext": spec.wikitext,
            "dtype": dtype.name,
        },
        "sources": [{"path": str(p), "bytes": p.stat().st_size} for p in spec.files]
        + (
            [{"hf_dataset": spec.hf_dataset, "config": spec.hf_config, "split": spec.hf_split}]
            if spec.hf_dataset
            else []
        ),
        "stats": {
            "tokens": sum(s["tokens"] for s in shards),
            "sequences": sum(s["sequences"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "replaced_invalid_utf8": stats.replaced_chars,
            "gutenberg_headers_stripped": stats.gutenberg_stripped,
            "gutenberg_missing_markers": stats.gutenberg_missing_markers,
            "seconds": round(time.time() - t0, 3),
        },
        "shards": shards,
        "command": command or sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_bytes(out / TOKENIZER_FILE, tok.to_str().encode())
    atomic_write_json(manifest_path, manifest)
    return manifest


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm  # deferred: tqdm (~40 ms) only with a progress bar; keeps `preprocess --help` fast

    return tqdm(
        total=total or None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="preprocess",
        file=sys.stderr,
        mininterval=0.5,
    )
