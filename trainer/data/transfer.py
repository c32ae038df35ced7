"""Transfer sets: the unlabeled text a teacher labels and a student distils on, enumerated in one fixed order.

The example id of a transfer example is its position in `transfer_examples`, so the labeler, the
soft-label store and the distillation stage agree on ids without storing the text;
`transfer_fingerprint` identifies the set (files' contents and every option that changes examples).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trainer.config import to_dict
from trainer.data.tasks import load_split, resolve_task, split_path
from trainer.data.text_sources import SourceSpec, SourceStats, iter_pieces
from trainer.fileio import sha256_file

SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class TransferSection:
    """The unlabeled transfer set: text/JSONL files, a `datasets` dataset, or a labeled task's split
    (gold labels are then kept, so the inspector can report the teacher's accuracy)."""

    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    doc_mode: Literal["file", "blank_line", "line"] = "line"  # for plain text files
    hf_dataset: str | None = None
    hf_split: str = "train"
    task: str | None = None  # e.g. sst2: use its split's texts (text_a) and gold labels
    task_split: str = "train"
    data_root: str | None = None
    split_sentences: bool = False  # e.g. IMDb reviews -> sentences (the movie-review transfer set for SST-2)
    strip_html: bool = True  # IMDb keeps <br /> tags
    min_chars: int = 1
    max_examples: int | None = None


def split_into_sentences(text: str) -> list[str]:
    """Cut after ., ! or ? (and closing quotes) when the next word starts upper-case or with a digit."""
    cuts = [m.end() for m in SENTENCE_END.finditer(text)]
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return [p.strip() for p in pieces if p.strip()]


def transfer_examples(t: TransferSection) -> Iterator[tuple[str, int]]:
    """(text, gold label or -1) in a fixed order: the example id is the position in this stream."""

    def units(text: str, gold: int) -> Iterator[tuple[str, int]]:
        if t.strip_html:
            text = HTML_BREAK.sub(" ", text)
        for piece in split_into_sentences(text) if t.split_sentences else [text.strip()]:
            if len(piece) >= t.min_chars:
                yield piece, gold

    def stream() -> Iterator[tuple[str, int]]:
        if t.task:
            loaded = load_split(resolve_task(t.task), t.task_split, Path(t.data_root) if t.data_root else None)
            for e in loaded.examples:
                yield from units(e.text_a, int(e.label))
        if t.files or t.hf_dataset:
            spec = SourceSpec(
                files=[Path(f) for f in t.files],
                doc_mode=t.doc_mode,
                text_field=t.text_field,
                hf_dataset=t.hf_dataset,
                hf_split=t.hf_split,
            )
            current, buf = -1, []
            for doc, piece in iter_pieces(spec, SourceStats()):
                if doc != current and buf:
                    yield from units("".join(buf), -1)
                    buf = []
                current = doc
                buf.append(piece)
            if buf:
                yield from units("".join(buf), -1)

    for i, example in enumerate(stream()):
        if t.max_examples is not None and i >= t.max_examples:
            return
        yield example


def transfer_fingerprint(t: TransferSection) -> str:
    """Identity of the transfer set: its files' contents and every option that changes the examples."""
    key = {k: v for k, v in to_dict(t).items() if k not in ("files", "data_root")}
    key["files"] = [[Path(f).name, sha256_file(f)] for f in t.files]
    if t.task:
        path = split_path(resolve_task(t.task), t.task_split, Path(t.data_root) if t.data_root else None)
        key["task_file"] = [path.name, sha256_file(path)]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
