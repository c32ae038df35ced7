"""Transfer sets: the unlabeled text a teacher labels and a student distils on, enumerated in one fixed order.

An example is one text or a pair of texts (`Example.text_b`), as in a labeled task: a pair task's split
keeps both fields, and JSONL, TSV (header) or `datasets` rows give a pair with `text_b_field`. A set is
all singles or all pairs (`transfer_inputs`), so the teacher, the store and the student can be checked
against it. The example id of a transfer example is its position in `transfer_examples`, so the labeler,
the soft-label store and the distillation stage agree on ids without storing the text;
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
from trainer.data.tasks import Example, load_split, resolve_task, split_path
from trainer.data.text_sources import SourceSpec, SourceStats, iter_pieces, iter_records
from trainer.errors import UserError
from trainer.fileio import sha256_file

Inputs = Literal["single", "pair"]
PLURAL = {"pair": "sentence pairs", "single": "single texts"}  # for messages

SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class TransferSection:
    """The unlabeled transfer set: text/JSONL/TSV files, a `datasets` dataset, or a labeled task's split
    (gold labels are then kept, so the inspector can report the teacher's accuracy). Pairs: a pair task
    (rte, mrpc: both of its fields), or `text_b_field` naming the second text of every file row / dataset row."""

    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    text_b_field: str | None = None  # pairs from files / hf_dataset: the second text's JSONL key, TSV column
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

    def validate(self) -> None:
        if self.text_b_field is not None and not (self.files or self.hf_dataset):
            raise ValueError("transfer.text_b_field names the second text of files / hf_dataset rows: give one")
        if self.text_b_field is not None and self.text_b_field == self.text_field:
            raise ValueError(f"transfer.text_b_field is text_field ('{self.text_field}'): a pair needs two fields")


def transfer_inputs(t: TransferSection) -> Inputs:
    """ "pair" when every example is two texts, else "single"; a mix (a pair task's split beside files without
    text_b_field, or the reverse) and sentence splitting of pairs are refused: nothing could label them alike."""
    task_pairs = resolve_task(t.task).text_b is not None if t.task else None
    file_pairs = t.text_b_field is not None if (t.files or t.hf_dataset) else None
    kinds = {k for k in (task_pairs, file_pairs) if k is not None}
    if len(kinds) > 1:
        raise UserError(
            f"transfer: task '{t.task}' gives {'pairs' if task_pairs else 'single texts'} but the files / dataset "
            f"give {'pairs' if file_pairs else 'single texts'} ("
            + ("set transfer.text_b_field" if task_pairs else "drop transfer.text_b_field")
            + "): a transfer set is all single texts or all pairs"
        )
    pairs = kinds == {True}
    if pairs and t.split_sentences:
        raise UserError("transfer.split_sentences cuts single texts into sentences; a pair cannot be cut (set false)")
    return "pair" if pairs else "single"


def split_into_sentences(text: str) -> list[str]:
    """Cut after ., ! or ? (and closing quotes) when the next word starts upper-case or with a digit."""
    cuts = [m.end() for m in SENTENCE_END.finditer(text)]
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return [p.strip() for p in pieces if p.strip()]


def transfer_examples(t: TransferSection) -> Iterator[Example]:
    """The examples (`Example`: text_a, text_b for pairs, label: gold class or score, None when unknown) in a
    fixed order: the example id is the position in this stream."""
    pairs = transfer_inputs(t) == "pair"

    def clean(text: str) -> str:
        return HTML_BREAK.sub(" ", text) if t.strip_html else text

    def units(text: str, gold: int | float | None, source: str) -> Iterator[Example]:
        text = clean(text)
        for piece in split_into_sentences(text) if t.split_sentences else [text.strip()]:
            if len(piece) >= t.min_chars:
                yield Example(piece, None, gold, source)

    def pair(a: str, b: str, gold: int | float | None, source: str) -> Iterator[Example]:
        a, b = clean(a).strip(), clean(b).strip()
        if not b:  # a pair task's loader refuses an empty second text itself; files and datasets here
            raise UserError(f"{source}: the second text of the pair is empty: half a pair cannot be labeled")
        if len(a) >= t.min_chars:
            yield Example(a, b, gold, source)

    def stream() -> Iterator[Example]:
        if t.task:
            loaded = load_split(resolve_task(t.task), t.task_split, Path(t.data_root) if t.data_root else None)
            for e in loaded.examples:
                yield from pair(e.text_a, e.text_b, e.label, e.source) if pairs else units(e.text_a, e.label, e.source)
        if not (t.files or t.hf_dataset):
            return
        spec = SourceSpec(
            files=[Path(f) for f in t.files],
            doc_mode=t.doc_mode,
            text_field=t.text_field,
            hf_dataset=t.hf_dataset,
            hf_split=t.hf_split,
        )
        if pairs:
            for source, row in iter_records(spec, [t.text_field, str(t.text_b_field)]):
                yield from pair(row[t.text_field], row[str(t.text_b_field)], None, source)
            return
        current, buf = -1, []
        for doc, piece in iter_pieces(spec, SourceStats()):
            if doc != current and buf:
                yield from units("".join(buf), None, "transfer")
                buf = []
            current = doc
            buf.append(piece)
        if buf:
            yield from units("".join(buf), None, "transfer")

    for i, example in enumerate(stream()):
        if t.max_examples is not None and i >= t.max_examples:
            return
        yield example


def transfer_fingerprint(t: TransferSection) -> str:
    """Identity of the transfer set: its files' contents and every option that changes the examples."""
    key = {k: v for k, v in to_dict(t).items() if k not in ("files", "data_root")}
    if key.get("text_b_field") is None:  # single texts keep the fingerprint they had before pairs existed
        key.pop("text_b_field", None)
    if transfer_inputs(t) == "pair":  # a task YAML may name its second column differently later
        key["inputs"] = "pair"
    key["files"] = [[Path(f).name, sha256_file(f)] for f in t.files]
    if t.task:
        path = split_path(resolve_task(t.task), t.task_split, Path(t.data_root) if t.data_root else None)
        key["task_file"] = [path.name, sha256_file(path)]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
