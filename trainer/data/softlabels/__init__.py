"""Teacher soft labels: computed once by `wellread label`, streamed from disk into distillation runs.

A store is a directory::

    part-j0003of0016-r01of04-00000.<role>.bin
                        one shard ("part"): one file per role (below). The stem names the writer that
                        made it (job shard 3 of 16, rank 1 of 4) and its running part number, so any
                        number of independent writers share the directory without colliding
    part-j0003of0016-r01of04-00000.json
                        sidecar, written after every file of the part is fsynced and renamed: per file
                        its name, dtype, shape, bytes and sha256; kind, k / vocab_size / num_classes,
                        example count, positions (mlm) and example-id range. A part without a sidecar
                        is unfinished: its writer deletes and redoes it when resumed
    order.bin           int64 [n], written by `finalize`: the row, in the concatenation of the shards
                        in manifest order, of the example with the i-th smallest example id. It makes
                        "global index i" of the reader example-id order, whichever writer wrote what
    manifest.json       written last, by `finalize`: format name/version, kind, dtypes and shapes, k,
                        vocab_size / num_classes, every shard's sidecar (files, sha256, counts, id
                        range), order.bin's checksum, totals, and the labeler's header (teacher
                        fingerprint, tokenizer hash, transfer-set fingerprint, command, config)

Every .bin is a 32-byte header (little endian), then the C-order array (so it is np.memmap-able)::

    magic    8 bytes  b"WRSOFT\\x00\\x01"
    version  u32      1
    dtype    4 bytes  numpy dtype string, NUL padded: b"<f2", b"<i8", b"<u2" or b"<i4"
    rows     u64
    cols     u64      0 for a vector [rows], else the array is [rows, cols]

Roles, for a part of n examples and T positions (all little endian)::

    classification  ids            <i8  [n]       example id: global index into the transfer set
                    gold           <i8  [n]       gold label, -1 when unknown
                    logits         <f2  [n, C]    teacher logits
    mlm             ids            <i8  [n]
                    offsets        <i8  [n + 1]   example e owns positions offsets[e]:offsets[e + 1]
                    tokens         tok  [T]       the token ids the teacher saw
                    topk_ids       tok  [T, k]    the teacher's k most likely tokens per position
                    topk_logprobs  <f2  [T, k]    their log-probabilities under the full softmax

`tok` is <u2 when vocab_size <= 65,536, else <i4. Writers flush parts of exactly `part_examples`
examples in the order they were given (only the last part of a writer may be shorter), which is what
lets a killed labeler resume by skipping `examples_done` examples and end with the same bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np

from trainer.data.sampling import Cursor, Permutation
from trainer.errors import UserError
from trainer.fileio import TMP_SUFFIX, atomic_open, atomic_write_json, read_json, sha256_file

Kind = Literal["classification", "mlm"]
KINDS = ("classification", "mlm")
FORMAT_NAME = "wellread-soft-labels"
VERSION = 1
MAGIC = b"WRSOFT\x00\x01"
HEADER = struct.Struct("<8sI4sQQ")
MANIFEST = "manifest.json"
ORDER_FILE = "order.bin"
ROLES: dict[str, tuple[str, ...]] = {
    "classification": ("ids", "gold", "logits"),
    "mlm": ("ids", "offsets", "tokens", "topk_ids", "topk_logprobs"),
}
FP16 = np.dtype("<f2")
I64 = np.dtype("<i8")
_DTYPES = {"<f2", "<i8", "<u2", "<i4"}
_FP16_MIN = float(np.finfo(np.float16).min)
_LOGPROB_TOL = 1e-2  # a stored log-probability above this is not a log-probability

_WRITER_ID = re.compile(r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$")
_STEM = r"part-[A-Za-z0-9_-]+-\d{5,}"
_DATA_FILE = re.compile(rf"^(?P<stem>{_STEM})\.(?P<role>[a-z_]+)\.bin$")
_SIDECAR = re.compile(rf"^(?P<stem>{_STEM})\.json$")
_PART_TMP = re.compile(rf"^\.(?P<stem>{_STEM})\.(?:[a-z_]+\.bin|json)\.\d+{re.escape(TMP_SUFFIX)}$")
_STORE_TMP = re.compile(rf"^\.(?:{re.escape(MANIFEST)}|{re.escape(ORDER_FILE)})\.\d+{re.escape(TMP_SUFFIX)}$")


def make_writer_id(job_shard_index: int, num_job_shards: int, rank: int, world_size: int) -> str:
    """`j0003of0016-r01of04`: unique per (job shard, rank), so writers never touch each other's files."""
    if not (0 <= job_shard_index < num_job_shards and 0 <= rank < world_size):
        raise ValueError(f"bad writer position: job shard {job_shard_index} of {num_job_shards}, "
                         f"rank {rank} of {world_size}")
    return f"j{job_shard_index:04d}of{num_job_shards:04d}-r{rank:02d}of{world_size:02d}"


def part_stem(writer_id: str, part: int) -> str:
    return f"part-{writer_id}-{part:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def _check_writer_id(writer_id: str) -> None:
    if not isinstance(writer_id, str) or not _WRITER_ID.match(writer_id):
        raise ValueError(f"writer id {writer_id!r} must be letters/digits joined by '-' or '_' "
                         "(see make_writer_id)")


# ---------------------------------------------------------------------------------------------- files
def _write_array(path: Path, arr: np.ndarray) -> dict:
    """Header + array under a temp name, fsync, rename (trainer.fileio); returns the sidecar entry."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.str not in _DTYPES or arr.ndim not in (1, 2):
        raise AssertionError(f"unexpected array {arr.dtype.str} {arr.shape} for {path.name}")
    cols = arr.shape[1] if arr.ndim == 2 else 0
    with atomic_open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, arr.dtype.str.encode().ljust(4, b"\0"), arr.shape[0], cols))
        f.write(arr.tobytes())
    return {"file": path.name, "dtype": arr.dtype.str, "shape": list(arr.shape), "bytes": HEADER.size + arr.nbytes,
            "sha256": sha256_file(path)}


def _read_array(path: Path, meta: dict, shard: str) -> np.ndarray:
    """Memory-map one file after checking its header against its sidecar/manifest entry (never reads data)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UserError(f"{path}: truncated header in shard {shard}")
    magic, version, dt, rows, cols = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise UserError(f"{path}: not a wellread soft-label file (bad magic or version) in shard {shard}")
    dtype_str = dt.rstrip(b"\0").decode("ascii", "replace")
    shape = [rows] if cols == 0 else [rows, cols]
    if dtype_str != meta["dtype"] or shape != list(meta["shape"]):
        raise UserError(f"{path}: header says {dtype_str} {shape}, expected {meta['dtype']} {meta['shape']} "
                        f"in shard {shard}")
    dtype = np.dtype(dtype_str)
    if path.stat().st_size != HEADER.size + dtype.itemsize * math.prod(shape):
        raise UserError(f"{path}: size {path.stat().st_size} does not match its header in shard {shard}")
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=tuple(shape))


def _verify_files(directory: Path, entry: dict, checksum: bool, source: str) -> None:
    """Presence and size of every file of a shard, and its sha256 when `checksum`; errors name the shard."""
    name = entry["name"]
    for meta in entry["files"].values():
        path = directory / meta["file"]
        if not path.is_file():
            raise UserError(f"{path}: file of shard {name} listed in {source} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise UserError(f"{path}: {size} bytes, {source} says {meta['bytes']}: shard {name} is truncated "
                            "or corrupt")
        if checksum:
            digest = sha256_file(path)
            if digest != meta["sha256"]:
                raise UserError(f"{path}: checksum mismatch in shard {name} (sha256 {digest[:12]}.. != {source} "
                                f"{meta['sha256'][:12]}..): the file is corrupt")


def _open_part(directory: Path, entry: dict) -> dict[str, np.ndarray]:
    """Memory-map a shard's files and check that their shapes agree with each other and the entry."""
    name, kind, n = entry["name"], entry["kind"], int(entry["examples"])
    roles = ROLES[kind]
    if sorted(entry["files"]) != sorted(roles):
        raise UserError(f"{directory}: shard {name} has files {sorted(entry['files'])}, a {kind} shard needs "
                        f"{sorted(roles)}")
    arrays = {role: _read_array(directory / entry["files"][role]["file"], entry["files"][role], name)
              for role in roles}
    if kind == "classification":
        expected = {"ids": (n,), "gold": (n,), "logits": (n, entry["num_classes"])}
    else:
        t, k = int(entry["positions"]), entry["k"]
        expected = {"ids": (n,), "offsets": (n + 1,), "tokens": (t,), "topk_ids": (t, k), "topk_logprobs": (t, k)}
        off = arrays["offsets"]
        if int(off[0]) != 0 or int(off[-1]) != t:
            raise UserError(f"{directory}: shard {name}: offsets do not span its {t} positions")
    for role, shape in expected.items():
        if arrays[role].shape != shape:
            raise UserError(f"{directory}: shard {name}: {role} has shape {list(arrays[role].shape)}, "
                            f"expected {list(shape)}")
    return arrays


def _kind_settings(kind: str, num_classes: int | None, k: int | None, vocab_size: int | None) -> dict:
    if kind == "classification":
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"classification soft labels need num_classes >= 1, got {num_classes}")
        return {"kind": kind, "num_classes": num_classes}
    if kind == "mlm":
        if not isinstance(k, int) or k < 1 or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"mlm soft labels need k >= 1 and vocab_size >= 2, got k={k}, vocab_size={vocab_size}")
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds vocab_size={vocab_size}")
        return {"kind": kind, "k": k, "vocab_size": vocab_size}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------- writing
def finished_parts(store_dir: str | Path, writer_id: str, cleanup: bool = True) -> list[dict]:
    """Sidecars of the writer's leading run of intact parts; with `cleanup` (only the writer itself, when
    it resumes) deletes its temp files and everything after.

    Only this writer's files are touched: other writers may be running in the same directory, so
    anyone else counting their progress passes `cleanup=False`. Sizes and headers are checked, not
    sha256 (`finalize` does that once at the end).
    """
    directory = Path(store_dir)
    _check_writer_id(writer_id)
    if not directory.is_dir():
        return []
    own = re.compile(rf"^\.?part-{re.escape(writer_id)}-(\d{{5,}})\.")
    files: dict[int, list[Path]] = {}
    for path in directory.iterdir():
        m = own.match(path.name)
        if m is None:
            continue
        if path.name.startswith("."):  # temp file of a killed writer: its part has no sidecar yet
            if cleanup:
                path.unlink(missing_ok=True)
        else:
            files.setdefault(int(m.group(1)), []).append(path)
    done: list[dict] = []
    for part in itertools.count():
        stem = part_stem(writer_id, part)
        sidecar = directory / f"{stem}.json"
        if not sidecar.is_file():
            break
        try:
            info = read_json(sidecar, "soft-label part sidecar")
            if info.get("name") != stem or info.get("writer") != writer_id or info.get("part") != part:
                break
            _verify_files(directory, info, checksum=False, source=sidecar.name)
            _open_part(directory, info)
        except (UserError, KeyError, TypeError):
            break
        done.append(info)
    for part, paths in files.items():  # unfinished, broken, or after a gap: redone by the resumed writer
        if cleanup and part >= len(done):
            for path in sorted(paths, key=lambda p: p.suffix != ".json"):  # sidecar first
                path.unlink(missing_ok=True)
    return done


class SoftLabelWriter:
    """Buffers one writer's teacher outputs and publishes them as finished parts of `part_examples`.

    Re-opening with the same `writer_id` resumes: `examples_done` examples (the first ones this
    writer was given) are already on disk, the caller skips them and adds the rest.
    """

    def __init__(self, store_dir: str | Path, writer_id: str, kind: Kind, *, num_classes: int | None = None,
                 k: int | None = None, vocab_size: int | None = None, part_examples: int = 8192):
        _check_writer_id(writer_id)
        if part_examples < 1:
            raise ValueError(f"part_examples must be >= 1, got {part_examples}")
        self.directory = Path(store_dir)
        self.writer_id = writer_id
        self.kind = kind
        self.settings = {**_kind_settings(kind, num_classes, k, vocab_size), "part_examples": part_examples}
        self.part_examples = part_examples
        self.tok_dtype = token_dtype(vocab_size) if kind == "mlm" else None
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / MANIFEST).exists():
            raise UserError(f"{self.directory}: soft-label store is already finalized ({MANIFEST} exists); "
                            "label into a new directory")
        self.finished = finished_parts(self.directory, writer_id)
        for info in self.finished:
            diff = {key: info.get(key) for key, value in self.settings.items() if info.get(key) != value}
            if diff:
                raise UserError(f"{self.directory / info['name']}.json: written with other settings {diff} "
                                f"than now {({key: self.settings[key] for key in diff})}; use the same settings "
                                "or a new store directory")
        self._chunks: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self.closed = False

    @property
    def examples_done(self) -> int:
        """Examples of this writer in finished parts: what a resumed labeler skips."""
        return sum(int(info["examples"]) for info in self.finished)

    def add_classification(self, example_ids: np.ndarray, logits: np.ndarray, gold: np.ndarray | None = None) -> None:
        if self.kind != "classification":
            raise ValueError(f"add_classification on a {self.kind} writer")
        ids = self._ids(example_ids)
        n, c = ids.size, self.settings["num_classes"]
        logits = np.asarray(logits)
        if logits.shape != (n, c):
            raise ValueError(f"logits have shape {logits.shape}, expected {(n, c)}")
        values = logits.astype(FP16)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise UserError(f"teacher logits are NaN/inf or beyond the fp16 range for example id(s) "
                            f"{ids[bad][:5].tolist()}")
        if gold is None:
            labels = np.full(n, -1, dtype=I64)
        else:
            labels = np.array(gold, dtype=I64).reshape(-1)
            if labels.shape != (n,) or ((labels < -1) | (labels >= c)).any():
                raise ValueError(f"gold labels must be {n} values in [-1, {c})")
        self._add({"ids": ids, "gold": labels, "logits": values})

    def add_mlm(self, example_ids: np.ndarray, token_ids: list[np.ndarray], topk_ids: list[np.ndarray],
                topk_logprobs: list[np.ndarray]) -> None:
        if self.kind != "mlm":
            raise ValueError(f"add_mlm on a {self.kind} writer")
        ids = self._ids(example_ids)
        n, k, vocab = ids.size, self.settings["k"], self.settings["vocab_size"]
        if not len(token_ids) == len(topk_ids) == len(topk_logprobs) == n:
            raise ValueError(f"{n} example ids but {len(token_ids)}/{len(topk_ids)}/{len(topk_logprobs)} "
                             "token/top-k id/top-k log-prob arrays")
        lengths = np.array([np.asarray(t).size for t in token_ids], dtype=I64)
        for i in range(n):
            shape = (int(lengths[i]), k)
            if np.ndim(token_ids[i]) != 1 or np.shape(topk_ids[i]) != shape or np.shape(topk_logprobs[i]) != shape:
                raise ValueError(f"example {int(ids[i])}: token ids {np.shape(token_ids[i])}, top-k ids "
                                 f"{np.shape(topk_ids[i])}, top-k log-probs {np.shape(topk_logprobs[i])}; "
                                 f"expected [L], [L, {k}], [L, {k}]")
        tokens = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t in token_ids]) if n else \
            np.zeros(0, np.int64)
        top = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1, k) for t in topk_ids]) if n else \
            np.zeros((0, k), np.int64)
        lp = np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1, k) for t in topk_logprobs]) if n else \
            np.zeros((0, k), np.float64)
        for what, arr in (("token", tokens), ("top-k", top)):
            if arr.size and (arr.min() < 0 or arr.max() >= vocab):
                raise ValueError(f"{what} ids outside [0, {vocab})")
        if np.isnan(lp).any() or (lp.size and lp.max() > _LOGPROB_TOL):
            raise UserError(f"teacher top-k log-probabilities are NaN or positive for example id(s) "
                            f"{ids[:5].tolist()}...")
        self._add({"ids": ids, "lengths": lengths}, {
            "tokens": tokens.astype(self.tok_dtype), "topk_ids": top.astype(self.tok_dtype),
            # -inf (and anything below fp16's range) becomes fp16's most negative value
            "topk_logprobs": np.maximum(lp, _FP16_MIN).astype(FP16),
        })

    def close(self) -> list[dict]:
        """Publish the buffered tail as a last (shorter) part; returns all finished parts of this writer."""
        if not self.closed:
            self._flush(final=True)
            self.closed = True
        return self.finished

    def __enter__(self) -> SoftLabelWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # a crash must not publish a short part: the resumed run would then differ
            self._chunks, self._buffered, self.closed = [], 0, True

    # -- internals
    def _ids(self, example_ids: np.ndarray) -> np.ndarray:
        if self.closed:
            raise ValueError("writer is closed")
        ids = np.array(example_ids, dtype=I64).reshape(-1)
        if ids.size and ids.min() < 0:
            raise ValueError("example ids must be >= 0")
        return ids

    def _add(self, per_example: dict[str, np.ndarray], per_position: dict[str, np.ndarray] | None = None) -> None:
        n = per_example["ids"].size
        if n == 0:
            return
        self._chunks.append({**per_example, **(per_position or {})})
        self._buffered += n
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if self._buffered == 0 or (self._buffered < self.part_examples and not final):
            return
        buf = {key: np.concatenate([c[key] for c in self._chunks]) for key in self._chunks[0]}
        pos_off = np.concatenate([[0], np.cumsum(buf["lengths"])]) if self.kind == "mlm" else None
        start = 0
        while self._buffered - start >= self.part_examples or (final and self._buffered > start):
            end = min(start + self.part_examples, self._buffered)
            if self.kind == "classification":
                arrays = {role: buf[role][start:end] for role in ROLES["classification"]}
                extra = {}
            else:
                a, b = int(pos_off[start]), int(pos_off[end])
                arrays = {"ids": buf["ids"][start:end], "offsets": pos_off[start:end + 1] - a,
                          **{role: buf[role][a:b] for role in ("tokens", "topk_ids", "topk_logprobs")}}
                extra = {"positions": b - a}
            self._write_part(arrays, extra)
            start = end
        if self.kind == "mlm":
            a = int(pos_off[start])
            self._chunks = [{"ids": buf["ids"][start:].copy(), "lengths": buf["lengths"][start:].copy(),
                             **{role: buf[role][a:].copy() for role in ("tokens", "topk_ids", "topk_logprobs")}}]
        else:
            self._chunks = [{key: value[start:].copy() for key, value in buf.items()}]
        self._buffered -= start
        if self._buffered == 0:
            self._chunks = []

    def _write_part(self, arrays: dict[str, np.ndarray], extra: dict) -> None:
        part = len(self.finished)
        stem = part_stem(self.writer_id, part)
        files = {role: _write_array(self.directory / f"{stem}.{role}.bin", arr) for role, arr in arrays.items()}
        ids = arrays["ids"]
        info = {"name": stem, "writer": self.writer_id, "part": part, **self.settings,
                "examples": int(ids.size), **extra, "id_min": int(ids.min()), "id_max": int(ids.max()),
                "files": files}
        atomic_write_json(self.directory / f"{stem}.json", info)  # last: marks the part finished
        self.finished.append(info)


# ---------------------------------------------------------------------------------------------- finalize
def finalize(store_dir: str | Path, header: dict, expected_examples: int | None = None) -> dict:
    """Verify every finished part of every writer, then publish `order.bin` and `manifest.json`.

    `header` must hold `tokenizer_hash` (and `transfer_fingerprint`, may be None): the keys
    `SoftLabelStore.check_compatible` compares. With `expected_examples`, the example ids must be
    exactly 0..expected_examples-1.
    """
    directory = Path(store_dir)
    if not isinstance(header, dict) or "tokenizer_hash" not in header:
        raise ValueError("finalize needs a header dict with at least 'tokenizer_hash'")
    try:
        json.dumps(header)
    except (TypeError, ValueError) as e:
        raise ValueError(f"header is not JSON-serializable: {e}") from None
    if not directory.is_dir():
        raise UserError(f"{directory}: soft-label directory not found")
    data: dict[str, list[str]] = {}
    sidecars: list[str] = []
    for path in sorted(directory.iterdir()):
        if m := _PART_TMP.match(path.name):
            raise UserError(f"{directory}: shard {m['stem']} is unfinished (temporary file {path.name} left by a "
                            "killed writer); re-run its labeler job to resume it, then finalize")
        if _STORE_TMP.match(path.name):  # an earlier finalize was killed
            path.unlink(missing_ok=True)
        elif m := _DATA_FILE.match(path.name):
            data.setdefault(m["stem"], []).append(path.name)
        elif m := _SIDECAR.match(path.name):
            sidecars.append(m["stem"])
    unfinished = sorted(set(data) - set(sidecars))
    if unfinished:
        raise UserError(f"{directory}: shard {unfinished[0]} is unfinished (no sidecar {unfinished[0]}.json); "
                        "re-run its labeler job to resume it, then finalize")
    if not sidecars:
        raise UserError(f"{directory}: no finished soft-label parts to finalize")

    entries: list[dict] = []
    all_ids: list[np.ndarray] = []
    settings: dict | None = None
    has_gold = False
    positions = 0
    for stem in sidecars:
        info = read_json(directory / f"{stem}.json", "soft-label part sidecar")
        try:
            if info["name"] != stem or info["kind"] not in KINDS:
                raise KeyError("name/kind")
            mine = _kind_settings(info["kind"], info.get("num_classes"), info.get("k"), info.get("vocab_size"))
            _verify_files(directory, info, checksum=True, source=f"{stem}.json")
            arrays = _open_part(directory, info)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{directory}: shard {stem}: malformed sidecar ({e})") from None
        if settings is None:
            settings, first = mine, stem
        elif mine != settings:
            raise UserError(f"{directory}: shard {stem} is {mine}, but shard {first} is {settings}: one store "
                            "holds one kind of labels of one shape")
        listed = sorted(meta["file"] for meta in info["files"].values())
        if sorted(data.get(stem, [])) != listed:
            raise UserError(f"{directory}: shard {stem}: files on disk {sorted(data.get(stem, []))} differ from its "
                            f"sidecar {listed}")
        ids = np.array(arrays["ids"])  # a copy: the part's maps (and their descriptors) are released
        if ids.size == 0 or int(ids.min()) != info["id_min"] or int(ids.max()) != info["id_max"] or ids.min() < 0:
            raise UserError(f"{directory}: shard {stem}: example ids disagree with its sidecar's id range")
        if info["kind"] == "mlm":
            if (np.diff(np.asarray(arrays["offsets"])) < 0).any():
                raise UserError(f"{directory}: shard {stem}: offsets are not monotonic")
            positions += int(info["positions"])
        else:
            has_gold = has_gold or bool((np.asarray(arrays["gold"]) >= 0).any())
        all_ids.append(ids)
        entries.append(info)

    ids = np.concatenate(all_ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    cum = np.cumsum([0] + [e["examples"] for e in entries])

    def shard_of(row: int) -> str:
        return entries[int(np.searchsorted(cum, row, side="right")) - 1]["name"]

    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        i = int(dup[0])
        raise UserError(f"{directory}: example id {int(sorted_ids[i])} is labeled twice, in shard "
                        f"{shard_of(int(order[i]))} and shard {shard_of(int(order[i + 1]))} ({dup.size} duplicate(s) "
                        "in all): two labeler jobs covered the same examples")
    if expected_examples is not None:
        if sorted_ids[-1] >= expected_examples:
            i = int(np.searchsorted(sorted_ids, expected_examples))
            raise UserError(f"{directory}: shard {shard_of(int(order[i]))} holds example id {int(sorted_ids[i])}, "
                            f"but the transfer set has {expected_examples} examples")
        if ids.size != expected_examples:
            gaps = np.flatnonzero(sorted_ids != np.arange(ids.size))
            first_missing = int(gaps[0]) if gaps.size else ids.size
            raise UserError(f"{directory}: {expected_examples - ids.size} of {expected_examples} example ids have "
                            f"no soft labels (first: {first_missing}); a labeler job did not finish")

    order_meta = _write_array(directory / ORDER_FILE, order.astype(I64))
    kind = settings["kind"]
    if kind == "classification":
        dtypes = {"ids": "<i8", "gold": "<i8", "logits": FP16.str}
        shapes = {"ids": ["n"], "gold": ["n"], "logits": ["n", settings["num_classes"]]}
    else:
        tok = token_dtype(settings["vocab_size"]).str
        dtypes = {"ids": "<i8", "offsets": "<i8", "tokens": tok, "topk_ids": tok, "topk_logprobs": FP16.str}
        shapes = {"ids": ["n"], "offsets": ["n + 1"], "tokens": ["T"], "topk_ids": ["T", settings["k"]],
                  "topk_logprobs": ["T", settings["k"]]}
    manifest = {
        "format": FORMAT_NAME,
        "version": VERSION,
        **settings,
        "dtypes": dtypes,
        "shapes": shapes,
        "has_gold": has_gold,
        "expected_examples": expected_examples,
        "totals": {"examples": int(ids.size), "positions": positions, "shards": len(entries),
                   "bytes": sum(m["bytes"] for e in entries for m in e["files"].values()) + order_meta["bytes"]},
        "order": order_meta,
        "shards": entries,
        "header": header,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- reading
class SoftLabelStore:
    """Random access to a finalized store through np.memmap: nothing is loaded into memory up front.

    Global index i in [0, len) is the example with the i-th smallest example id. `verify="full"`
    checks every file's sha256 against the manifest (a flipped byte names its shard), `"size"` only
    presence, sizes and headers (for huge stores already verified once). Each open shard holds one
    file descriptor per file (mmap keeps one), so at most `max_open_shards` stay mapped (LRU) and a
    store of thousands of parts stays under the usual `ulimit -n` of 1024.
    """

    def __init__(self, store_dir: str | Path, verify: Literal["full", "size"] = "full", *,
                 max_open_shards: int = 64):
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        self.directory = Path(store_dir)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{self.directory}: no {MANIFEST} (not a soft-label store, or labeling did not finish: "
                            "re-run `wellread label` to resume and finalize it)")
        self.manifest = read_json(manifest_path, "soft-label manifest")
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("version") != VERSION:
            raise UserError(f"{manifest_path}: not a {FORMAT_NAME} v{VERSION} manifest")
        self.kind: str = self.manifest["kind"]
        self.num_classes: int | None = self.manifest.get("num_classes")
        self.k: int | None = self.manifest.get("k")
        self.vocab_size: int | None = self.manifest.get("vocab_size")
        self.header: dict = self.manifest["header"]
        self.shard_names: list[str] = [entry["name"] for entry in self.manifest["shards"]]
        self.max_open_shards = max(1, max_open_shards)
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        for entry in self.manifest["shards"]:
            _verify_files(self.directory, entry, checksum=verify == "full", source=MANIFEST)
            _open_part(self.directory, entry)  # headers and shapes; unmapped again right away
        order_entry = {"name": ORDER_FILE, "files": {"order": self.manifest["order"]}}
        _verify_files(self.directory, order_entry, checksum=verify == "full", source=MANIFEST)
        self._order = _read_array(self.directory / ORDER_FILE, self.manifest["order"], ORDER_FILE)
        self._cum = np.cumsum([0] + [int(entry["examples"]) for entry in self.manifest["shards"]])
        if len(self._order) != self._cum[-1]:
            raise UserError(f"{self.directory / ORDER_FILE}: {len(self._order)} entries for {self._cum[-1]} examples")

    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    def shard(self, j: int) -> dict[str, np.ndarray]:
        """Memory-mapped arrays of shard j (roles as in the module docstring), from a small LRU of open maps."""
        arrays = self._open.get(j)
        if arrays is None:
            arrays = _open_part(self.directory, self.manifest["shards"][j])
            self._open[j] = arrays
            if len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(j)
        return arrays

    @property
    def has_gold(self) -> bool:
        return bool(self.manifest.get("has_gold"))

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global indices -> (shard number, row inside the shard)."""
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"soft-label index out of range [0, {len(self)})")
        rows = np.asarray(self._order[indices], dtype=np.int64)
        shard = np.searchsorted(self._cum, rows, side="right") - 1
        return shard, rows - self._cum[shard]

    def example(self, i: int) -> dict[str, np.ndarray]:
        """Views of the stored values of example i, in their on-disk dtypes (bit-exact)."""
        shard, row = self._locate(np.array([i], dtype=np.int64))
        arr, r = self.shard(int(shard[0])), int(row[0])
        if self.kind == "classification":
            return {"example_id": np.array(arr["ids"][r]), "logits": arr["logits"][r], "gold": np.array(arr["gold"][r])}
        a, b = int(arr["offsets"][r]), int(arr["offsets"][r + 1])
        return {"example_id": np.array(arr["ids"][r]), "token_ids": arr["tokens"][a:b],
                "topk_ids": arr["topk_ids"][a:b], "topk_logprobs": arr["topk_logprobs"][a:b]}

    def batch(self, indices: np.ndarray | list[int], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Padded arrays for a student step; an empty `indices` gives arrays with a 0-sized batch axis.

        classification: example_ids [B] int64, logits [B, C] float32, gold [B] int64 (-1 unknown).
        mlm: example_ids [B], input_ids [B, T] int64 (pad 0), attention_mask [B, T] int64, topk_ids
        [B, T, k] int64 and topk_logprobs [B, T, k] float32 (both 0 at padding: mask them out).
        T is the longest example, or `pad_to`.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard, row = self._locate(idx)
        bsz = idx.size
        ids = np.empty(bsz, dtype=np.int64)
        if self.kind == "classification":
            logits = np.empty((bsz, self.num_classes), dtype=np.float32)
            gold = np.empty(bsz, dtype=np.int64)
            for s in np.unique(shard):
                sel = shard == s
                arr = self.shard(int(s))
                ids[sel], logits[sel], gold[sel] = arr["ids"][row[sel]], arr["logits"][row[sel]], arr["gold"][row[sel]]
            return {"example_ids": ids, "logits": logits, "gold": gold}
        spans = []
        for j in range(bsz):
            arr, r = self.shard(int(shard[j])), int(row[j])
            ids[j] = arr["ids"][r]
            spans.append((arr, int(arr["offsets"][r]), int(arr["offsets"][r + 1])))
        longest = max((b - a for _, a, b in spans), default=0)
        if pad_to is not None and longest > pad_to:
            raise ValueError(f"an example has {longest} positions, more than pad_to={pad_to}")
        t = longest if pad_to is None else pad_to
        input_ids = np.zeros((bsz, t), dtype=np.int64)
        mask = np.zeros((bsz, t), dtype=np.int64)
        top_ids = np.zeros((bsz, t, self.k), dtype=np.int64)
        top_lp = np.zeros((bsz, t, self.k), dtype=np.float32)
        for j, (arr, a, b) in enumerate(spans):
            input_ids[j, :b - a] = arr["tokens"][a:b]
            mask[j, :b - a] = 1
            top_ids[j, :b - a] = arr["topk_ids"][a:b]
            top_lp[j, :b - a] = arr["topk_logprobs"][a:b]
        return {"example_ids": ids, "input_ids": input_ids, "attention_mask": mask, "topk_ids": top_ids,
                "topk_logprobs": top_lp}

    def check_compatible(self, tokenizer_hash: str, transfer_fingerprint: str | None, where: str) -> None:
        """Refuse labels made with another tokenizer or transfer set, or whose files went missing since.

        Checksums were verified when the store was opened (verify="full"); this re-checks presence and
        sizes, which is cheap, so a file deleted or truncated after opening is still caught.
        """
        theirs = self.header.get("tokenizer_hash")
        if theirs != tokenizer_hash:
            raise UserError(f"{where}: soft labels in {self.directory} were made with another tokenizer (hash "
                            f"{str(theirs)[:12]}.. != {tokenizer_hash[:12]}..); re-label with this tokenizer")
        if transfer_fingerprint is not None:
            theirs = self.header.get("transfer_fingerprint")
            if theirs != transfer_fingerprint:
                raise UserError(f"{where}: soft labels in {self.directory} were made for other transfer data "
                                f"(fingerprint {str(theirs)[:12]}.. != {transfer_fingerprint[:12]}..)")
        try:
            for entry in self.manifest["shards"]:
                _verify_files(self.directory, entry, checksum=False, source=MANIFEST)
            _verify_files(self.directory, {"name": ORDER_FILE, "files": {"order": self.manifest["order"]}},
                          checksum=False, source=MANIFEST)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------- sampling
class StoreSampler:
    """Which store indices each rank distils on, per global batch: every example once per epoch.

    Epoch e visits a Feistel permutation keyed by (seed, e); global batch b is positions
    [b*G, min((b+1)*G, n)) of it, so the last batch of an epoch is partial rather than dropped. Each
    global batch of m items is cut into `world_size` contiguous slices whose sizes differ by at most
    one (a rank may get none). The position is a `Cursor`: resuming costs O(1), nothing is replayed.
    """

    def __init__(self, n_examples: int, global_batch: int, rank: int, world_size: int, seed: int):
        if n_examples < 1:
            raise UserError("the soft-label store has no examples")
        if global_batch < 1:
            raise UserError(f"global batch must be >= 1, got {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.g, self.rank, self.world, self.seed = n_examples, global_batch, rank, world_size, seed
        self.batches_per_epoch = -(-n_examples // global_batch)
        self._perm: tuple[int, Permutation] | None = None

    def order(self, epoch: int) -> Permutation:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(self.n, self.seed, epoch))
        return self._perm[1]

    def _check(self, cursor: Cursor) -> None:
        if cursor.epoch < 0 or not 0 <= cursor.batch < self.batches_per_epoch:
            raise UserError(f"cursor (epoch {cursor.epoch}, batch {cursor.batch}) is outside the "
                            f"{self.batches_per_epoch} global batches of {self.g} per epoch over {self.n} examples: "
                            "the checkpoint was made for another soft-label store or batch size")

    def global_batch_size(self, cursor: Cursor) -> int:
        """Items in this global batch over all ranks (G, or fewer for the last batch of an epoch)."""
        self._check(cursor)
        return min(self.g, self.n - cursor.batch * self.g)

    def global_items(self, cursor: Cursor) -> np.ndarray:
        start = cursor.batch * self.g
        return self.order(cursor.epoch)(np.arange(start, start + self.global_batch_size(cursor)))

    def rank_items(self, cursor: Cursor) -> np.ndarray:
        """This rank's store indices for the global batch at `cursor` (possibly empty, never skipped)."""
        m = self.global_batch_size(cursor)
        start = cursor.batch * self.g
        lo, hi = start + self.rank * m // self.world, start + (self.rank + 1) * m // self.world
        if hi == lo:
            return np.zeros(0, dtype=np.int64)
        return self.order(cursor.epoch)(np.arange(lo, hi))

    def advance(self, cursor: Cursor) -> Cursor:
        self._check(cursor)
        nxt = cursor.batch + 1
        return Cursor(cursor.epoch + 1, 0) if nxt >= self.batches_per_epoch else Cursor(cursor.epoch, nxt)


# ---------------------------------------------------------------------------------------------- analysis
def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def topk_kl_to_full(full_logprobs: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> float:
    """Mean over positions of KL(q || p): p the teacher's full distribution, q its stored top-k renormalised.

    This is what keeping only k costs. The other direction, KL(p || q), is infinite whenever p puts
    any mass outside the top-k (q is 0 there), so it cannot measure anything. With exact top-k
    values KL(q || p) = -log(sum of the top-k probabilities); fp16 rounding of the stored values
    adds its own (small) share. Inputs: [..., V], [..., k], [..., k]; `full_logprobs` may be logits.
    """
    full = _log_softmax(np.asarray(full_logprobs, dtype=np.float64))
    ids = np.asarray(topk_ids, dtype=np.int64)
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if ids.shape != lp.shape or ids.shape[:-1] != full.shape[:-1]:
        raise ValueError(f"shapes disagree: full {full.shape}, top-k ids {ids.shape}, top-k log-probs {lp.shape}")
    log_q = _log_softmax(lp)
    log_p = np.take_along_axis(full, ids, axis=-1)
    kl = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
    return float(np.mean(kl)) if kl.size else 0.0
