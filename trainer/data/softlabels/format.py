"""The soft-label store's on-disk layout: the one place that defines file names, roles, dtypes and checks.

A store is a directory::

    part-j0003of0016-r01of04-00000.<role>.bin
                        one shard ("part"): one file per role (below). The stem names the writer that
                        made it (job shard 3 of 16, rank 1 of 4) and its running part number, so any
                        number of independent writers share the directory without colliding
    part-j0003of0016-r01of04-00000.json
                        sidecar, written after every file of the part is fsynced and renamed: format
                        version, per file its name, dtype, shape, bytes and sha256; kind, k / vocab_size /
                        num_classes (and class_names, below), example count, positions (mlm) and example-id
                        range. A part without a sidecar is unfinished: its writer deletes and redoes it when
                        resumed
    order.bin           written by `finalize`: the row, in the concatenation of the shards in manifest
                        order, of the example with the i-th smallest example id. It makes "global index
                        i" of the reader example-id order, whichever writer wrote what
    manifest.json       written last, by `finalize`: format name/version, kind, the dtypes in use per
                        role, shapes, k, vocab_size / num_classes, every shard's sidecar (files, sha256,
                        counts, id range), order.bin's checksum, totals, and the labeler's header
                        (teacher fingerprint, tokenizer hash, transfer-set fingerprint, command, config).
                        Classification only, optional: class_names, the labeling teacher's name of each
                        logit column (its id2label, e.g. ["negative", "positive"]), so a student distilled
                        from the store alone names its classes; absent when the teacher had only the
                        LABEL_0, LABEL_1 .. defaults, and in stores made before it was recorded

Every .bin is one record of trainer/data/binfile.py (32-byte header, then the C-order array) with
magic b"WRSOFT\\x00\\x01" and the store's VERSION. Roles, for a part of n examples and T positions (KIND_ROLES
below is this table for the code: the writer, the part checks and the labeler go by it)::

    classification  ids            idx  [n]       example id: global index into the transfer set
                    gold           lab  [n]       gold label, -1 when unknown (regression: the score, NaN)
                    logits         <f2  [n, C]    teacher logits (regression, C = 1: the teacher's score)
                    cls            <f2  [n, L*H]  optional (labeling's output.cls_layers): the teacher's [CLS]
                                                  vector after each of the L listed layers (layer-major rows,
                                                  as binfile is 2-D), for Patient KD without a teacher
    mlm             ids            idx  [n]
                    offsets        idx  [n + 1]   example e owns positions offsets[e]:offsets[e + 1]
                    tokens         tok  [T]       the token ids the teacher saw
                    topk_ids       tok  [T, k]    the teacher's k most likely tokens per position
                    topk_logprobs  <f2  [T, k]    their log-probabilities under the full softmax

Widths are the narrowest that fit (version 2; version 1 spent int64 on every integer): `idx` (ids,
offsets, order.bin) is <u4 unless a value reaches 2^32, then <u8, chosen per file; `lab` is the
smallest signed type holding -1..C-1 (int8 up to 127 classes), or <f4 for a regression teacher (one
output, as wellread's classifiers do regression: num_classes 1); `tok` is binfile.token_dtype(vocab).
Each file's own dtype is in its sidecar entry and header, so readers never assume one. Writers flush
parts of exactly `part_examples` examples in the order they were given (only the last part of a
writer may be shorter), which is what lets a killed labeler resume by skipping `examples_done`
examples and end with the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from trainer.data.binfile import narrowest_int, narrowest_uint, read_array, token_dtype, write_array
from trainer.errors import UserError
from trainer.fileio import TMP_SUFFIX, sha256_file

Kind = Literal["classification", "mlm"]
KINDS = ("classification", "mlm")
FORMAT_NAME = "wellread-soft-labels"
VERSION = 2
MAGIC = b"WRSOFT\x00\x01"  # unchanged since version 1, so a version-1 file gets the version message
RELABEL = "re-run `wellread label` into a new directory"
MANIFEST = "manifest.json"
ORDER_FILE = "order.bin"
FP16 = np.dtype("<f2")
FP16_MIN = float(np.finfo(np.float16).min)
LOGPROB_TOL = 1e-2  # a stored log-probability above this is not a log-probability


@dataclass(frozen=True)
class Role:
    """One file of a part (the table in the module docstring). `rows`: one per example, n + 1 (offsets) or one
    per position; `dtype`: idx / lab / tok (narrowest integers, see above) or fp16; `columns`: of a 2-D role,
    from the store's settings; `source`: who gives it to the writer (the labeler's `id`s and `input`s, the
    `teacher`, or the `writer` itself); `when`: the setting that turns an optional role on."""

    name: str
    rows: Literal["example", "offset", "position"]
    dtype: Literal["idx", "lab", "tok", "fp16"]
    source: Literal["id", "input", "teacher", "writer"]
    columns: Callable[[dict], int] | None = None
    when: str | None = None


#: every role of every kind, in file order (the order of a sidecar's "files")
KIND_ROLES: dict[str, tuple[Role, ...]] = {
    "classification": (
        Role("ids", "example", "idx", "id"),
        Role("gold", "example", "lab", "input"),  # -1 when unknown; the writer's default
        Role("logits", "example", "fp16", "teacher", lambda s: s["num_classes"]),
        Role("cls", "example", "fp16", "teacher", lambda s: len(s["cls_layers"]) * s["hidden_size"], "cls_layers"),
    ),
    "mlm": (
        Role("ids", "example", "idx", "id"),
        Role("offsets", "offset", "idx", "writer"),
        Role("tokens", "position", "tok", "input"),  # the token ids the teacher saw
        Role("topk_ids", "position", "tok", "teacher", lambda s: s["k"]),
        Role("topk_logprobs", "position", "fp16", "teacher", lambda s: s["k"]),
    ),
}
#: the roles every part of a kind has (optional ones left out)
ROLES: dict[str, tuple[str, ...]] = {
    kind: tuple(r.name for r in roles if r.when is None) for kind, roles in KIND_ROLES.items()
}

_WRITER_ID = re.compile(r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$")
_STEM = r"part-[A-Za-z0-9_-]+-\d{5,}"
DATA_FILE = re.compile(rf"^(?P<stem>{_STEM})\.(?P<role>[a-z_]+)\.bin$")
SIDECAR = re.compile(rf"^(?P<stem>{_STEM})\.json$")
PART_TMP = re.compile(rf"^\.(?P<stem>{_STEM})\.(?:[a-z_]+\.bin|json)\.\d+{re.escape(TMP_SUFFIX)}$")
STORE_TMP = re.compile(rf"^\.(?:{re.escape(MANIFEST)}|{re.escape(ORDER_FILE)})\.\d+{re.escape(TMP_SUFFIX)}$")


def make_writer_id(job_shard_index: int, num_job_shards: int, rank: int, world_size: int) -> str:
    """`j0003of0016-r01of04`: unique per (job shard, rank), so writers never touch each other's files."""
    if not (0 <= job_shard_index < num_job_shards and 0 <= rank < world_size):
        raise ValueError(
            f"bad writer position: job shard {job_shard_index} of {num_job_shards}, rank {rank} of {world_size}"
        )
    return f"j{job_shard_index:04d}of{num_job_shards:04d}-r{rank:02d}of{world_size:02d}"


def part_stem(writer_id: str, part: int) -> str:
    return f"part-{writer_id}-{part:05d}"


def check_writer_id(writer_id: str) -> None:
    if not isinstance(writer_id, str) or not _WRITER_ID.match(writer_id):
        raise ValueError(f"writer id {writer_id!r} must be letters/digits joined by '-' or '_' (see make_writer_id)")


def gold_dtype(num_classes: int) -> np.dtype:
    """Gold labels are -1 (unknown) .. num_classes - 1; a regression store's (one output) are float32 scores,
    NaN when unknown."""
    return np.dtype("<f4") if is_regression(num_classes) else narrowest_int(-1, num_classes - 1)


def is_regression(num_classes: int) -> bool:
    """A one-output classifier is a regression model (STS-B), as trainer/models/classify.py builds them."""
    return num_classes == 1


def index_dtype(max_value: int) -> np.dtype:
    """Example ids, position offsets and order.bin entries."""
    return narrowest_uint(max_value)


def store_roles(settings: dict) -> tuple[Role, ...]:
    """The roles of a part with these settings: the kind's, and the optional ones their setting turns on."""
    return tuple(r for r in KIND_ROLES[settings["kind"]] if r.when is None or settings.get(r.when))


def part_roles(settings: dict) -> tuple[str, ...]:
    """The role (file) names of a part with these settings, in file order."""
    return tuple(r.name for r in store_roles(settings))


def labeled_roles(settings: dict) -> tuple[str, ...]:
    """What a labeler hands the writer for each example (SoftLabelWriter.add): its inputs and the teacher's."""
    return tuple(r.name for r in store_roles(settings) if r.source in ("input", "teacher"))


def position_roles(settings: dict) -> tuple[str, ...]:
    """The roles with one row per position (mlm: ragged per example, cut by the offsets)."""
    return tuple(r.name for r in store_roles(settings) if r.rows == "position")


def role_shapes(settings: dict, rows: dict[str, int | str]) -> dict[str, tuple]:
    """Each role's shape, given its row counts by kind of row (`{"example": n, "offset": n + 1, "position": T}`;
    numbers for a part, or names for the manifest's description)."""
    return {r.name: (rows[r.rows],) + ((r.columns(settings),) if r.columns else ()) for r in store_roles(settings)}


def role_dtypes(settings: dict) -> dict[str, str | None]:
    """The dtype of each role fixed by the store's settings; None where it depends on a file's values."""
    fixed = {
        "idx": lambda: None,
        "lab": lambda: gold_dtype(settings["num_classes"]).str,
        "tok": lambda: token_dtype(settings["vocab_size"]).str,
        "fp16": lambda: FP16.str,
    }
    return {r.name: fixed[r.dtype]() for r in store_roles(settings)}


def check_sidecar_version(info: dict, source: str | Path) -> None:
    """A part written by another format version is refused by name, never silently redone or mixed."""
    version = info.get("version", 1)
    if version != VERSION:
        raise UserError(
            f"{source}: soft-label part of format version {version}, this wellread reads version {VERSION}; {RELABEL}"
        )


def kind_settings(
    kind: str,
    num_classes: int | None,
    k: int | None,
    vocab_size: int | None,
    cls_layers: list[int] | None = None,
    hidden_size: int | None = None,
    teacher_layers: int | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """The settings every part of a store shares. [CLS] states (classification only) come with the teacher's
    hidden size and depth, so a reader can map a student's layers onto the stored ones (PKD). `class_names`
    (classification only; None: unnamed) are the teacher's names of the logit columns, kept only when given,
    so a store of an unnamed teacher has the settings it had before names were recorded."""
    if class_names is not None and kind != "classification":
        raise ValueError(f"class names are for classification soft labels, not {kind!r}")
    if kind == "classification":
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"classification soft labels need num_classes >= 1, got {num_classes}")
        names = {} if class_names is None else {"class_names": _class_names(class_names, num_classes)}
        if not cls_layers:
            return {"kind": kind, "num_classes": num_classes, **names}
        if not (isinstance(hidden_size, int) and hidden_size > 0 and isinstance(teacher_layers, int)):
            raise ValueError(
                f"[CLS] states need the teacher's hidden size and depth, got {hidden_size}, {teacher_layers}"
            )
        layers = [int(x) for x in cls_layers]
        if layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] > teacher_layers:
            raise ValueError(f"cls_layers must be increasing teacher layers in 1..{teacher_layers}, got {cls_layers}")
        return {
            "kind": kind,
            "num_classes": num_classes,
            "cls_layers": layers,
            "hidden_size": hidden_size,
            "teacher_layers": teacher_layers,
            **names,
        }
    if kind == "mlm":
        if not isinstance(k, int) or k < 1 or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"mlm soft labels need k >= 1 and vocab_size >= 2, got k={k}, vocab_size={vocab_size}")
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds vocab_size={vocab_size}")
        return {"kind": kind, "k": k, "vocab_size": vocab_size}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _class_names(names: list[str], num_classes: int) -> list[str]:
    """One distinct, non-empty name per class, in logit-column order."""
    if (
        not isinstance(names, (list, tuple))
        or len(names) != num_classes
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError(f"class_names must be {num_classes} distinct non-empty names, got {names!r}")
    return list(names)


# ---------------------------------------------------------------------------------------------- files
def write_role(path: Path, arr: np.ndarray) -> dict:
    """One role file, atomically (binfile.write_array); returns its sidecar entry."""
    return write_array(path, arr, MAGIC, VERSION)


def read_role(path: Path, meta: dict, shard: str) -> np.ndarray:
    """Memory-map one file after checking its header against its sidecar/manifest entry (never reads data)."""
    arr = read_array(path, MAGIC, VERSION, f"soft-label shard {shard}", hint=RELABEL)
    if arr.dtype.str != meta["dtype"] or list(arr.shape) != list(meta["shape"]):
        raise UserError(
            f"{path}: header says {arr.dtype.str} {list(arr.shape)}, expected {meta['dtype']} "
            f"{meta['shape']} in shard {shard}"
        )
    return arr


def verify_files(directory: Path, entry: dict, checksum: bool, source: str) -> None:
    """Presence and size of every file of a shard, and its sha256 when `checksum`; errors name the shard."""
    name = entry["name"]
    for meta in entry["files"].values():
        path = directory / meta["file"]
        if not path.is_file():
            raise UserError(f"{path}: file of shard {name} listed in {source} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise UserError(
                f"{path}: {size} bytes, {source} says {meta['bytes']}: shard {name} is truncated or corrupt"
            )
        if checksum:
            digest = sha256_file(path)
            if digest != meta["sha256"]:
                raise UserError(
                    f"{path}: checksum mismatch in shard {name} (sha256 {digest[:12]}.. != {source} "
                    f"{meta['sha256'][:12]}..): the file is corrupt"
                )


def open_part(directory: Path, entry: dict) -> dict[str, np.ndarray]:
    """Memory-map a shard's files and check their shapes and dtypes against each other and the entry."""
    name, kind, n = entry["name"], entry["kind"], int(entry["examples"])
    roles = part_roles(entry)
    if sorted(entry["files"]) != sorted(roles):
        raise UserError(
            f"{directory}: shard {name} has files {sorted(entry['files'])}, a {kind} shard needs {sorted(roles)}"
        )
    arrays = {role: read_role(directory / entry["files"][role]["file"], entry["files"][role], name) for role in roles}
    t = int(entry["positions"]) if "offsets" in arrays else None
    if t is not None:
        off = arrays["offsets"]
        if int(off[0]) != 0 or int(off[-1]) != t:
            raise UserError(f"{directory}: shard {name}: offsets do not span its {t} positions")
    expected = role_shapes(entry, {"example": n, "offset": n + 1, "position": t})
    for role, shape in expected.items():
        if arrays[role].shape != shape:
            raise UserError(
                f"{directory}: shard {name}: {role} has shape {list(arrays[role].shape)}, expected {list(shape)}"
            )
    for role, dtype in role_dtypes(entry).items():
        got = arrays[role].dtype
        if (dtype is not None and got.str != dtype) or (dtype is None and got.kind != "u"):
            raise UserError(f"{directory}: shard {name}: {role} is {got.str}, expected {dtype or 'unsigned'}")
    return arrays
