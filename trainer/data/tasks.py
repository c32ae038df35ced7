"""Labeled task data: GLUE TSV, generic TSV/CSV/JSONL files and `datasets` -> lists of `Example`.

A task is a `TaskSpec` (built in, or a YAML file holding one), so a new task is a recipe, not code.
Every example keeps its origin as "file:line" (the physical line where the row starts), so a bad row
in a 67k-line file becomes a one-line `UserError` pointing at it, or, with `skip_bad_rows`, is skipped
and counted by reason. Text is kept exactly as stored (no quote processing or stripping) unless the
spec asks for real CSV quoting.
"""

from __future__ import annotations

import codecs
import copy
import csv
import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.config import load_config
from trainer.errors import UserError

SPLITS = ("train", "dev", "test")
TaskFormat = Literal["glue_tsv", "tsv", "csv", "jsonl", "datasets"]
# `datasets` builders that read local files (the split paths) instead of a hub dataset.
LOCAL_BUILDERS = ("json", "csv", "parquet")
# Our split names -> `datasets` split names unless hf_split_map says otherwise (hub convention).
DEFAULT_HF_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
REPO_ROOT = Path(__file__).resolve().parents[2]

# Reasons a row can be rejected (keys of LoadedSplit.skipped_reasons).
MISSING_COLUMN = "missing column"
FIELD_COUNT = "wrong number of fields"
BAD_LABEL = "bad label"
EMPTY_TEXT = "empty text"
BAD_TEXT = "text not a string"
BAD_JSON = "invalid json"


@dataclass
class TaskSpec:
    """Where a task's splits live and how to read them; every field can be set from YAML."""

    name: str
    format: TaskFormat
    train: str | None = None  # paths relative to the data root, or absolute; `.gz` allowed
    dev: str | None = None
    test: str | None = None
    text_a: str = "sentence"  # column name, JSON key, or for header-less files an index like "3"
    text_b: str | None = None
    label: str = "label"
    labels: list[str] | None = field(default_factory=lambda: ["0", "1"])  # index order; None = regression
    label_names: list[str] | None = None  # what an exported classifier calls each of `labels`; default: labels
    header: bool = True
    quoting: Literal["none", "csv"] | None = None  # None: "csv" for format csv, else "none" (GLUE style)
    encoding: str = "utf-8-sig"  # also drops a leading BOM (MRPC has one)
    skip_bad_rows: bool = False
    hf_name: str | None = None  # format datasets: hub id, or json/csv/parquet to read the split paths
    hf_config: str | None = None
    hf_split_map: dict[str, str] | None = None  # our split -> datasets split (default dev -> validation)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Output size of the classifier head (1 for regression)."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def class_names(self) -> list[str] | None:
        """The names an exported classifier answers with (its id2label), in label order; None for regression."""
        return self.label_names or self.labels

    def resolved_quoting(self) -> Literal["none", "csv"]:
        if self.quoting is not None:
            return self.quoting
        return "csv" if self.format == "csv" else "none"

    def validate(self) -> None:
        if not self.name.strip():
            raise ValueError("task name must not be empty")
        if self.labels is not None:
            if not self.labels:
                raise ValueError(f"task {self.name}: labels must not be empty (use null for regression)")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task {self.name}: labels has duplicates: {self.labels}")
        if self.label_names is not None:
            if self.labels is None:
                raise ValueError(f"task {self.name}: label_names given for a regression task (labels: null)")
            if len(self.label_names) != len(self.labels):
                raise ValueError(
                    f"task {self.name}: label_names has {len(self.label_names)} names for the "
                    f"{len(self.labels)} labels [{', '.join(self.labels)}]"
                )
            if len(set(self.label_names)) != len(self.label_names):
                raise ValueError(f"task {self.name}: label_names has duplicates: {self.label_names}")
        if self.format == "glue_tsv" and self.quoting == "csv":
            raise ValueError(f"task {self.name}: glue_tsv never uses CSV quoting (use format: tsv, quoting: csv)")
        if self.format == "datasets":
            if not self.hf_name:
                raise ValueError(f"task {self.name}: format datasets needs hf_name")
        elif not any((self.train, self.dev, self.test)):
            raise ValueError(f"task {self.name}: set at least one of train, dev, test")
        if not self.header:
            if self.format not in ("glue_tsv", "tsv", "csv"):
                raise ValueError(f"task {self.name}: header: false only applies to tsv/csv formats")
            for key in ("text_a", "text_b", "label"):
                value = getattr(self, key)
                if value is not None and not value.isdigit():
                    raise ValueError(
                        f"task {self.name}: without a header, {key} must be a column index like '0', got '{value}'"
                    )
        for key in self.hf_split_map or {}:
            if key not in SPLITS:
                raise ValueError(f"task {self.name}: hf_split_map key '{key}' is not one of {', '.join(SPLITS)}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"task {self.name}: unknown encoding '{self.encoding}'") from None


def _glue(
    name: str,
    d: str,
    train: str,
    text_a: str,
    text_b: str | None = None,
    label: str = "label",
    labels: list[str] | None = None,
    header: bool = True,
    label_names: list[str] | None = None,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        format="glue_tsv",
        train=f"glue/{d}/{train}",
        dev=f"glue/{d}/dev.tsv",
        text_a=text_a,
        text_b=text_b,
        label=label,
        labels=["0", "1"] if labels is None else labels,
        header=header,
        label_names=label_names,
    )


# Paths are relative to the data root (../shared/data in the repo layout; see default_data_root).
# label_names follow each data set's encoding (../shared/data/README.md): SST-2, IMDb and the Blitzer reviews
# 0 = negative, 1 = positive; MRPC 1 = paraphrase; CoLA 1 = acceptable; RTE's labels are names already.
SENTIMENT = ["negative", "positive"]
BUILTIN_TASKS: dict[str, TaskSpec] = {
    "sst2": _glue("sst2", "SST-2", "train.tsv.gz", "sentence", label_names=SENTIMENT),
    "rte": _glue("rte", "RTE", "train.tsv", "sentence1", "sentence2", labels=["entailment", "not_entailment"]),
    "mrpc": _glue(
        "mrpc",
        "MRPC",
        "train.tsv",
        "#1 String",
        "#2 String",
        label="Quality",
        label_names=["not_equivalent", "equivalent"],
    ),
    # CoLA has no header: source, label, annotation, sentence.
    "cola": _glue(
        "cola", "CoLA", "train.tsv", "3", label="1", header=False, label_names=["unacceptable", "acceptable"]
    ),
    # IMDb has no dev split: its official test split serves as dev (as in most papers).
    "imdb": TaskSpec(
        name="imdb",
        format="jsonl",
        train="imdb/train.jsonl.gz",
        dev="imdb/test.jsonl.gz",
        text_a="text",
        label="label",
        label_names=SENTIMENT,
    ),
    # Blitzer books reviews, 1,700/300 split; `sentence` holds title + "\n\t" + review, so real CSV quoting.
    "amazon_books": TaskSpec(
        name="amazon_books",
        format="tsv",
        quoting="csv",
        train="amazon-books-blitzer/autoprompt_split/train.tsv.gz",
        dev="amazon-books-blitzer/autoprompt_split/dev.tsv",
        text_a="sentence",
        label="label",
        label_names=SENTIMENT,
    ),
    # GLUE STS-B (not in ../shared/data: a spec only). Regression on the 0-5 `score` column.
    "stsb": TaskSpec(
        name="stsb",
        format="glue_tsv",
        train="glue/STS-B/train.tsv",
        dev="glue/STS-B/dev.tsv",
        text_a="sentence1",
        text_b="sentence2",
        label="score",
        labels=None,
    ),
}
_ALIASES = {"sst_2": "sst2", "sts_b": "stsb", "amazon": "amazon_books", "amazon_books_blitzer": "amazon_books"}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def builtin_task(name: str) -> TaskSpec:
    """A fresh copy of a built-in spec (callers may change fields, e.g. skip_bad_rows)."""
    key = _ALIASES.get(_key(name), _key(name))
    if key not in BUILTIN_TASKS:
        raise UserError(f"unknown task '{name}' (built-in: {', '.join(BUILTIN_TASKS)}; or a task YAML file)")
    return copy.deepcopy(BUILTIN_TASKS[key])


def resolve_task(name_or_yaml_path: str | Path) -> TaskSpec:
    """A built-in task name, or a YAML file holding a TaskSpec mapping (the generic spec)."""
    text = str(name_or_yaml_path)
    path = Path(text).expanduser()
    is_builtin = _ALIASES.get(_key(text), _key(text)) in BUILTIN_TASKS
    if text.endswith((".yaml", ".yml")) or (not is_builtin and path.is_file()):
        return load_config(TaskSpec, path)
    return builtin_task(text)


def default_data_root() -> Path:
    """$WELLREAD_DATA if set, else ../shared/data beside the repository."""
    env = os.environ.get("WELLREAD_DATA")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


@dataclass(slots=True)
class Example:
    text_a: str
    text_b: str | None
    label: int | float  # index into TaskSpec.labels, or the float target for regression
    source: str  # "<file>:<line>", 1-based physical line where the row starts


@dataclass
class LoadedSplit:
    examples: list[Example]
    skipped: int
    path: Path
    skipped_reasons: dict[str, int] = field(default_factory=dict)


class _BadRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Builder:
    """Turns raw rows into Examples, applying the label map and the bad-row policy."""

    def __init__(self, task: TaskSpec, path: Path):
        self.task, self.path = task, path
        self.examples: list[Example] = []
        self.reasons: dict[str, int] = {}
        self.label_index = {lab: i for i, lab in enumerate(task.labels)} if task.labels is not None else None

    def add(self, line: int, get: Any) -> None:
        """`get(column)` returns the raw value or raises _BadRow; errors carry file:line."""
        try:
            text_a = self._text(get(self.task.text_a), self.task.text_a)
            text_b = self._text(get(self.task.text_b), self.task.text_b) if self.task.text_b is not None else None
            label = self._label(get(self.task.label))
        except _BadRow as bad:
            self.bad(line, bad.reason, str(bad))
            return
        self.examples.append(Example(text_a, text_b, label, f"{self.path}:{line}"))

    def bad(self, line: int, reason: str, message: str) -> None:
        if not self.task.skip_bad_rows:
            raise UserError(f"{self.path}:{line}: {message}")
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def result(self) -> LoadedSplit:
        return LoadedSplit(self.examples, sum(self.reasons.values()), self.path, dict(self.reasons))

    @staticmethod
    def _text(value: Any, column: str) -> str:
        if value is None:
            raise _BadRow(EMPTY_TEXT, f"empty text in column '{column}'")
        if not isinstance(value, str):
            raise _BadRow(BAD_TEXT, f"column '{column}' is not text: {value!r}")
        if not value.strip():
            raise _BadRow(EMPTY_TEXT, f"empty text in column '{column}'")
        return value

    def _label(self, value: Any) -> int | float:
        if self.label_index is None:
            return self._float_label(value)
        if isinstance(value, bool) or value is None:
            key = None
        elif isinstance(value, int):
            key = str(value)
        elif isinstance(value, float) and value.is_integer():
            key = str(int(value))
        else:
            key = str(value).strip()
        if key not in self.label_index:
            shown = value if isinstance(value, str) else repr(value)
            raise _BadRow(BAD_LABEL, f"label '{shown}' not in [{', '.join(self.label_index)}]")
        return self.label_index[key]

    @staticmethod
    def _float_label(value: Any) -> float:
        try:
            if isinstance(value, bool) or value is None:
                raise ValueError
            x = float(value.strip() if isinstance(value, str) else value)
            if not math.isfinite(x):
                raise ValueError
        except (TypeError, ValueError):
            raise _BadRow(BAD_LABEL, f"label '{value}' is not a finite number (regression task)") from None
        return x


def split_path(task: TaskSpec, split: str, data_root: Path | None) -> Path:
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (one of {', '.join(SPLITS)})")
    rel = getattr(task, split)
    if rel is None:
        raise UserError(f"task {task.name} has no {split} split (set '{split}:' in the task spec)")
    path = Path(rel).expanduser()
    if not path.is_absolute():
        path = (data_root if data_root is not None else default_data_root()) / path
    if not path.is_file():
        raise UserError(f"{path}: {task.name} {split} file not found (data root: $WELLREAD_DATA or --data-root)")
    return path


def _open(path: Path, encoding: str, newline: str) -> io.TextIOWrapper:
    raw: Any = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding=encoding, newline=newline)


def load_split(task: TaskSpec, split: str, data_root: Path | None = None) -> LoadedSplit:
    """Read one split of `task` into Examples; bad rows raise a one-line UserError (or are skipped)."""
    if task.format == "datasets":
        return _load_datasets(task, split, data_root)
    path = split_path(task, split, data_root)
    builder = _Builder(task, path)
    try:
        if task.format == "jsonl":
            with _open(path, task.encoding, newline="\n") as f:
                for line, row in _jsonl_rows(f, builder):
                    builder.add(line, _getter_dict(row))
        else:
            delimiter = "," if task.format == "csv" else "\t"
            csv_quoting = task.resolved_quoting() == "csv"
            # Plain mode splits on "\n" only, so a stray "\r" inside text cannot shift line numbers.
            with _open(path, task.encoding, newline="" if csv_quoting else "\n") as f:
                rows = _csv_rows(f, delimiter) if csv_quoting else _plain_rows(f, delimiter)
                _add_table(task, builder, rows)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(
            f"{path}: cannot read as {task.encoding}{' gzip' if path.suffix == '.gz' else ''} text: {e}"
        ) from None
    except csv.Error as e:
        raise UserError(f"{path}: CSV error: {e}") from None
    return builder.result()


def _plain_rows(f: io.TextIOWrapper, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """GLUE style: one row per line, no quote processing; blank lines are ignored."""
    for line, text in enumerate(f, 1):
        text = text.rstrip("\n").rstrip("\r")
        if text:
            yield line, text.split(delimiter)


def _csv_rows(f: io.TextIOWrapper, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Real CSV quoting: a row may span several physical lines; yields the line where it starts."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))  # long reviews exceed the 128 KiB default
    reader = csv.reader(f, delimiter=delimiter)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise csv.Error(f"line {start}: {e}") from None
        if row:
            yield start, row


def _add_table(task: TaskSpec, builder: _Builder, rows: Iterator[tuple[int, list[str]]]) -> None:
    columns: dict[str, int] = {}
    width: int | None = None
    needed = [c for c in (task.text_a, task.text_b, task.label) if c is not None]
    if task.header:
        first = next(rows, None)
        if first is None:
            raise UserError(f"{builder.path}: empty file (expected a header line)")
        names = [c.strip() for c in first[1]]
        missing = [c for c in needed if c not in names]
        if missing:
            raise UserError(f"{builder.path}:{first[0]}: no column '{missing[0]}' in header [{', '.join(names)}]")
        columns = {name: i for i, name in reversed(list(enumerate(names)))}  # first one wins on duplicates
        width = len(names)
    min_width = max(columns[c] if columns else int(c) for c in needed) + 1
    for line, row in rows:
        if width is None and len(row) >= min_width:
            width = len(row)  # header-less: the first complete row fixes the width
        builder.add(line, _getter_row(row, columns, width))


def _getter_row(row: list[str], columns: dict[str, int], width: int | None):
    def get(column: str) -> str:
        if width is not None and len(row) != width:
            reason = MISSING_COLUMN if len(row) < width else FIELD_COUNT
            raise _BadRow(reason, f"expected {width} fields, got {len(row)}")
        index = columns[column] if columns else int(column)
        if index >= len(row):
            raise _BadRow(MISSING_COLUMN, f"no column {index} (row has {len(row)} fields)")
        return row[index]

    return get


def _getter_dict(row: dict[str, Any]):
    def get(column: str) -> Any:
        if column not in row:
            raise _BadRow(MISSING_COLUMN, f"missing key '{column}'")
        return row[column]

    return get


def _jsonl_rows(f: io.TextIOWrapper, builder: _Builder) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            builder.bad(line, BAD_JSON, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(row, dict):
            builder.bad(line, BAD_JSON, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield line, row


def _load_datasets(task: TaskSpec, split: str, data_root: Path | None) -> LoadedSplit:
    """Via `datasets`: a hub dataset (when reachable), or local files with the json/csv/parquet builders."""
    import datasets  # deferred: datasets (seconds to import) only when a task asks for it

    assert task.hf_name is not None
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (one of {', '.join(SPLITS)})")
    hf_split = {**DEFAULT_HF_SPLITS, **(task.hf_split_map or {})}[split]
    local = task.hf_name in LOCAL_BUILDERS
    where = str(split_path(task, split, data_root)) if local else f"{task.hf_name}/{hf_split}"
    try:
        if local:
            ds = datasets.load_dataset(task.hf_name, data_files={hf_split: where}, split=hf_split)
        else:
            ds = datasets.load_dataset(task.hf_name, task.hf_config, split=hf_split)
    except Exception as e:  # hub/network/builder errors come in many types; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: datasets cannot load split '{hf_split}': {first}") from None
    needed = [c for c in (task.text_a, task.text_b, task.label) if c is not None]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise UserError(f"{where}: no column '{missing[0]}' (columns: {', '.join(ds.column_names)})")
    path = Path(where) if local or not ds.cache_files else Path(ds.cache_files[0]["filename"])
    builder = _Builder(task, Path(where))
    cols = {c: ds[c] for c in needed}
    label_feature = ds.features.get(task.label)
    names: Sequence[str] | None = getattr(label_feature, "names", None)  # ClassLabel ints -> names
    if names and task.labels is not None and not set(task.labels) <= {str(i) for i in range(len(names))}:
        cols[task.label] = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in cols[task.label]]
    for i in range(len(ds)):
        builder.add(i + 1, lambda c, i=i: cols[c][i])
    result = builder.result()
    result.path = path
    return result
