"""Stream documents out of text files (plain or .gz), JSONL files and `datasets` datasets.

Documents come out as a stream of `(doc_index, piece)` where a long document is several consecutive
pieces of at most ~PIECE_CHARS characters cut at line ends, so memory stays flat however large a
document or corpus is. Undecodable bytes are replaced with U+FFFD and counted.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trainer.errors import UserError

PIECE_CHARS = 1 << 16
DocMode = Literal["file", "blank_line", "line"]
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")


@dataclass
class SourceStats:
    """Counters that end up in the manifest."""

    replaced_chars: int = 0
    bytes_read: int = 0
    gutenberg_stripped: int = 0
    gutenberg_missing_markers: list[str] = field(default_factory=list)


class _CountingReplace:
    """A codecs error handler that replaces bad bytes with U+FFFD and counts them."""

    def __init__(self, stats: SourceStats):
        self.stats = stats

    def __call__(self, err: UnicodeDecodeError) -> tuple[str, int]:
        self.stats.replaced_chars += 1
        return "\ufffd", err.end


_HANDLER_NAME = "wellread-count-replace"
_current_stats: list[SourceStats] = [SourceStats()]  # codecs handlers are global: one slot per process


def _dispatch_handler(err: UnicodeDecodeError) -> tuple[str, int]:
    return _CountingReplace(_current_stats[0])(err)


codecs.register_error(_HANDLER_NAME, _dispatch_handler)


class _ByteCounter(io.RawIOBase):
    """Wraps a raw file to report how many on-disk bytes were consumed (for the progress bar)."""

    def __init__(self, raw, stats: SourceStats):
        self.raw, self.stats = raw, stats

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        self.stats.bytes_read += n or 0
        return n


def open_text(path: Path, stats: SourceStats) -> io.TextIOWrapper:
    """Open plain or gzip text as UTF-8 (BOM dropped), universal newlines, bad bytes counted."""
    raw = _ByteCounter(open(path, "rb"), stats)
    binary = gzip.GzipFile(fileobj=io.BufferedReader(raw), mode="rb") if path.suffix == ".gz" else raw
    _current_stats[0] = stats
    return io.TextIOWrapper(
        io.BufferedReader(binary) if binary is raw else binary, encoding="utf-8-sig", errors=_HANDLER_NAME, newline=None
    )


def strip_gutenberg(lines: Iterable[str], path: Path, stats: SourceStats) -> Iterator[str]:
    """Keep the lines strictly between the START and END markers (whole file if markers are absent)."""
    lines = iter(lines)
    head: list[str] = []
    for line in lines:
        if GUTENBERG_START.match(line):
            stats.gutenberg_stripped += 1
            break
        head.append(line)
        if len(head) > 2000:  # no START marker near the top: keep everything
            stats.gutenberg_missing_markers.append(str(path))
            yield from head
            yield from lines
            return
    else:
        stats.gutenberg_missing_markers.append(str(path))
        yield from head
        return
    for line in lines:
        if GUTENBERG_END.match(line):
            return
        yield line


WIKITEXT_SUBS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]"))


def wikitext_detokenize(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        for old, new in WIKITEXT_SUBS:
            line = line.replace(old, new)
        yield line


def _pieces_of_lines(lines: Iterable[str], doc_mode: DocMode) -> Iterator[tuple[bool, str]]:
    """(starts_new_document, text) pieces from lines; a document is a file, a paragraph or a line."""
    buf: list[str] = []
    size = 0
    new_doc = True
    for line in lines:
        if doc_mode == "line":
            if line.strip():
                yield True, line
            continue
        if doc_mode == "blank_line" and not line.strip():
            if buf:
                yield new_doc, "".join(buf)
                buf, size = [], 0
            new_doc = True
            continue
        buf.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield new_doc, "".join(buf)
            buf, size, new_doc = [], 0, False
    if buf:
        yield new_doc, "".join(buf)


@dataclass
class SourceSpec:
    """What to read: files (text or JSONL, by suffix) and/or one `datasets` dataset."""

    files: list[Path] = field(default_factory=list)
    doc_mode: DocMode = "file"
    text_field: str = "text"
    strip_gutenberg: bool = False
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_config: str | None = None
    wikitext: bool = False  # undo WikiText's " @-@ " style tokenization; <unk> becomes [UNK] (never masked)


def is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES)


def _jsonl_rows(path: Path, stats: SourceStats) -> Iterator[tuple[int, object]]:
    """(line number, decoded record) of every non-blank line; invalid JSON is a one-line error at its line."""
    with open_text(path, stats) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            yield lineno, record


def _jsonl_texts(path: Path, spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    for lineno, record in _jsonl_rows(path, stats):
        if not isinstance(record, dict) or spec.text_field not in record:
            raise UserError(f"{path}:{lineno}: record has no '{spec.text_field}' field")
        text = record[spec.text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: field '{spec.text_field}' is not a string")
        yield text


def _hf_texts(spec: SourceSpec) -> Iterator[str]:
    for i, record in enumerate(_hf_rows(spec)):
        if spec.text_field not in record:
            raise UserError(f"dataset '{spec.hf_dataset}' row {i}: no '{spec.text_field}' field")
        yield record[spec.text_field]


def _hf_rows(spec: SourceSpec) -> Iterator[dict]:
    """The rows of `spec.hf_dataset`: a local file or folder (json/parquet/csv/text by suffix) or a hub name."""
    # deferred: datasets (seconds to import) only for a Hugging Face source
    import datasets

    name = spec.hf_dataset
    assert name is not None
    local = Path(name)
    try:
        if local.exists():
            files = [str(p) for p in sorted(local.rglob("*")) if p.is_file()] if local.is_dir() else [name]
            kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "txt": "text"}
            ext = Path(files[0]).name.split(".")[1] if files else "txt"
            ds = datasets.load_dataset(kind.get(ext, "text"), data_files=files, split=spec.hf_split, streaming=True)
        else:
            ds = datasets.load_dataset(name, spec.hf_config, split=spec.hf_split, streaming=True)
    except Exception as e:  # datasets raises many types for unreachable hubs and bad names
        raise UserError(f"dataset '{name}': cannot load split '{spec.hf_split}': {e}".splitlines()[0]) from None
    yield from ds


def _tsv_records(path: Path, fields: list[str], stats: SourceStats) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a tab-separated file with a header, read as GLUE's are (no quote processing)."""
    with open_text(path, stats) as f:
        header = f.readline().rstrip("\n").split("\t")
        missing = [name for name in fields if name not in header]
        if missing:
            raise UserError(f"{path}:1: the header has no column '{missing[0]}' (columns: {', '.join(header)})")
        where = [header.index(name) for name in fields]
        for lineno, line in enumerate(f, 2):
            if not line.strip():
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) != len(header):
                raise UserError(f"{path}:{lineno}: {len(cells)} fields, the header has {len(header)}")
            yield f"{path}:{lineno}", {name: cells[i] for name, i in zip(fields, where)}


def iter_records(spec: SourceSpec, fields: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows with named text fields ("file:line" or "dataset row i", {field: text}) from JSONL, TSV files
    (`.tsv`, header row) and `spec.hf_dataset`, in a fixed order; a row lacking a field, or a field that is not
    text, is a one-line error naming it. For examples made of several texts (sentence pairs)."""
    stats = SourceStats()

    def checked(source: str, record: object) -> dict[str, str]:
        if not isinstance(record, dict):
            raise UserError(f"{source}: a record must be an object with fields {', '.join(fields)}")
        for name in fields:
            if name not in record:
                raise UserError(f"{source}: record has no '{name}' field")
            if not isinstance(record[name], str):
                raise UserError(f"{source}: field '{name}' is not a string")
        return {name: record[name] for name in fields}

    for path in spec.files:
        if not path.is_file():
            raise UserError(f"{path}: input file not found")
        name = path.name.lower()
        if is_jsonl(path):
            for lineno, record in _jsonl_rows(path, stats):
                yield f"{path}:{lineno}", checked(f"{path}:{lineno}", record)
        elif name.endswith((".tsv", ".tsv.gz")):
            yield from _tsv_records(path, fields, stats)
        else:
            raise UserError(f"{path}: rows with fields {', '.join(fields)} are read from JSONL or TSV (header) files")
    if spec.hf_dataset:
        for i, record in enumerate(_hf_rows(spec)):
            yield f"dataset '{spec.hf_dataset}' row {i}", checked(f"dataset '{spec.hf_dataset}' row {i}", record)


def iter_pieces(spec: SourceSpec, stats: SourceStats) -> Iterator[tuple[int, str]]:
    """The corpus as `(doc_index, piece)` in a fixed order (needed for resume)."""
    doc = -1

    def from_texts(texts: Iterable[str]) -> Iterator[tuple[int, str]]:
        nonlocal doc
        for text in texts:
            mode: DocMode = "file" if spec.doc_mode == "file" else spec.doc_mode
            for new, piece in _pieces_of_lines(io.StringIO(text), mode):
                if new:
                    doc += 1
                yield doc, piece

    for path in spec.files:
        if not path.is_file():
            raise UserError(f"{path}: input file not found")
        if is_jsonl(path):
            yield from from_texts(_jsonl_texts(path, spec, stats))
            continue
        with open_text(path, stats) as f:
            lines: Iterable[str] = strip_gutenberg(f, path, stats) if spec.strip_gutenberg else f
            if spec.wikitext:
                lines = wikitext_detokenize(lines)
            for new, piece in _pieces_of_lines(lines, spec.doc_mode):
                if new:
                    doc += 1
                yield doc, piece
    if spec.hf_dataset:
        yield from from_texts(_hf_texts(spec))


def input_bytes(spec: SourceSpec) -> int:
    return sum(p.stat().st_size for p in spec.files if p.is_file())
