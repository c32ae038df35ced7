"""Writing a soft-label store: one SoftLabelWriter per (job shard, rank), resumable part by part."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trainer.data.binfile import token_dtype
from trainer.data.softlabels.format import (
    FP16,
    FP16_MIN,
    LOGPROB_TOL,
    MANIFEST,
    VERSION,
    Kind,
    check_sidecar_version,
    check_writer_id,
    gold_dtype,
    index_dtype,
    is_regression,
    kind_settings,
    labeled_roles,
    open_part,
    part_stem,
    position_roles,
    store_roles,
    verify_files,
    write_role,
)
from trainer.errors import UserError
from trainer.fileio import atomic_write_json, read_json


def finished_parts(store_dir: str | Path, writer_id: str, cleanup: bool = True) -> list[dict]:
    """Sidecars of the writer's leading run of intact parts; with `cleanup` (only the writer itself, when
    it resumes) deletes its temp files and everything after.

    Only this writer's files are touched: other writers may be running in the same directory, so
    anyone else counting their progress passes `cleanup=False`. Sizes and headers are checked, not
    sha256 (`finalize` does that once at the end). A part of another format version is an error,
    not something to redo: deleting it would silently discard finished work.
    """
    directory = Path(store_dir)
    check_writer_id(writer_id)
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
        except UserError:
            break
        check_sidecar_version(info, sidecar)
        try:
            if info.get("name") != stem or info.get("writer") != writer_id or info.get("part") != part:
                break
            verify_files(directory, info, checksum=False, source=sidecar.name)
            open_part(directory, info)
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

    def __init__(
        self,
        store_dir: str | Path,
        writer_id: str,
        kind: Kind,
        *,
        num_classes: int | None = None,
        k: int | None = None,
        vocab_size: int | None = None,
        part_examples: int = 8192,
        cls_layers: list[int] | None = None,
        hidden_size: int | None = None,
        teacher_layers: int | None = None,
        class_names: list[str] | None = None,
    ):
        check_writer_id(writer_id)
        if part_examples < 1:
            raise ValueError(f"part_examples must be >= 1, got {part_examples}")
        self.directory = Path(store_dir)
        self.writer_id = writer_id
        self.kind = kind
        self.settings = {
            **kind_settings(kind, num_classes, k, vocab_size, cls_layers, hidden_size, teacher_layers, class_names),
            "part_examples": part_examples,
        }
        self.part_examples = part_examples
        self.tok_dtype = token_dtype(vocab_size) if kind == "mlm" else None
        self.gold_dtype = gold_dtype(num_classes) if kind == "classification" else None
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / MANIFEST).exists():
            raise UserError(
                f"{self.directory}: soft-label store is already finalized ({MANIFEST} exists); "
                "label into a new directory"
            )
        self.finished = finished_parts(self.directory, writer_id)
        for info in self.finished:
            diff = {key: info.get(key) for key, value in self.settings.items() if info.get(key) != value}
            if diff:
                raise UserError(
                    f"{self.directory / info['name']}.json: written with other settings {diff} "
                    f"than now { ({key: self.settings[key] for key in diff}) }; use the same settings "
                    "or a new store directory"
                )
        self._chunks: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self.closed = False

    @property
    def examples_done(self) -> int:
        """Examples of this writer in finished parts: what a resumed labeler skips."""
        return sum(int(info["examples"]) for info in self.finished)

    def add(self, example_ids: np.ndarray, **values: np.ndarray | Sequence[np.ndarray]) -> None:
        """Add examples, the same call for every kind: `values` holds each of the store's labeled roles
        (format.labeled_roles: classification gold, logits and, with cls_layers, cls; mlm tokens, topk_ids,
        topk_logprobs), one array per example (along positions for mlm) or one array with a row per example."""
        wanted = labeled_roles(self.settings)
        if sorted(values) != sorted(wanted):
            raise ValueError(f"this {self.kind} writer takes the roles {list(wanted)}, got {sorted(values)}")
        if self.kind == "classification":
            cls = _rows(values["cls"]) if "cls" in values else None
            self.add_classification(example_ids, _rows(values["logits"]), values["gold"], cls)
        else:
            self.add_mlm(example_ids, values["tokens"], values["topk_ids"], values["topk_logprobs"])

    def add_classification(
        self, example_ids: np.ndarray, logits: np.ndarray, gold: np.ndarray | None = None, cls: np.ndarray | None = None
    ) -> None:
        """`cls` [n, L, H]: the teacher's [CLS] vectors after the store's `cls_layers` (required exactly then)."""
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
            raise UserError(
                f"teacher logits are NaN/inf or beyond the fp16 range for example id(s) {ids[bad][:5].tolist()}"
            )
        if gold is None:
            labels = np.full(n, np.nan if is_regression(c) else -1, dtype=self.gold_dtype)
        elif is_regression(c):
            labels = np.array(gold, dtype=np.float32).reshape(-1)
            if labels.shape != (n,) or np.isinf(labels).any():
                raise ValueError(f"gold scores must be {n} finite values (NaN: unknown)")
        else:
            wide = np.array(gold, dtype=np.int64).reshape(-1)
            if wide.shape != (n,) or ((wide < -1) | (wide >= c)).any():
                raise ValueError(f"gold labels must be {n} values in [-1, {c})")
            labels = wide.astype(self.gold_dtype)
        extra = {}
        layers = self.settings.get("cls_layers")
        if (cls is None) != (not layers):
            raise ValueError("[CLS] states are given exactly when the writer keeps cls_layers")
        if layers:
            shape = (n, len(layers), self.settings["hidden_size"])
            if np.shape(cls) != shape:
                raise ValueError(f"[CLS] states have shape {np.shape(cls)}, expected {shape}")
            with np.errstate(over="ignore"):  # beyond fp16's range becomes inf, refused just below
                extra["cls"] = np.asarray(cls).astype(FP16).reshape(n, -1)  # binfile is 2-D: [n, L*H]
            if not np.isfinite(extra["cls"]).all():
                raise UserError(
                    f"teacher [CLS] states are NaN/inf or beyond the fp16 range for example id(s) "
                    f"{ids[~np.isfinite(extra['cls']).all(axis=1)][:5].tolist()}"
                )
        self._add({"ids": ids, "gold": labels, "logits": values, **extra})

    def add_mlm(
        self,
        example_ids: np.ndarray,
        token_ids: list[np.ndarray],
        topk_ids: list[np.ndarray],
        topk_logprobs: list[np.ndarray],
    ) -> None:
        if self.kind != "mlm":
            raise ValueError(f"add_mlm on a {self.kind} writer")
        ids = self._ids(example_ids)
        n, k, vocab = ids.size, self.settings["k"], self.settings["vocab_size"]
        if not len(token_ids) == len(topk_ids) == len(topk_logprobs) == n:
            raise ValueError(
                f"{n} example ids but {len(token_ids)}/{len(topk_ids)}/{len(topk_logprobs)} "
                "token/top-k id/top-k log-prob arrays"
            )
        lengths = np.array([np.asarray(t).size for t in token_ids], dtype=np.int64)
        for i in range(n):
            shape = (int(lengths[i]), k)
            if np.ndim(token_ids[i]) != 1 or np.shape(topk_ids[i]) != shape or np.shape(topk_logprobs[i]) != shape:
                raise ValueError(
                    f"example {int(ids[i])}: token ids {np.shape(token_ids[i])}, top-k ids "
                    f"{np.shape(topk_ids[i])}, top-k log-probs {np.shape(topk_logprobs[i])}; "
                    f"expected [L], [L, {k}], [L, {k}]"
                )
        tokens = (
            np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t in token_ids])
            if n
            else np.zeros(0, np.int64)
        )
        top = (
            np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1, k) for t in topk_ids])
            if n
            else np.zeros((0, k), np.int64)
        )
        lp = (
            np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1, k) for t in topk_logprobs])
            if n
            else np.zeros((0, k), np.float64)
        )
        for what, arr in (("token", tokens), ("top-k", top)):
            if arr.size and (arr.min() < 0 or arr.max() >= vocab):
                raise ValueError(f"{what} ids outside [0, {vocab})")
        if np.isnan(lp).any() or (lp.size and lp.max() > LOGPROB_TOL):
            raise UserError(
                f"teacher top-k log-probabilities are NaN or positive for example id(s) {ids[:5].tolist()}..."
            )
        self._add(
            {"ids": ids, "lengths": lengths},
            {
                "tokens": tokens.astype(self.tok_dtype),
                "topk_ids": top.astype(self.tok_dtype),
                # -inf (and anything below fp16's range) becomes fp16's most negative value
                "topk_logprobs": np.maximum(lp, FP16_MIN).astype(FP16),
            },
        )

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
        """Buffered as int64 (the caller's values, checked); narrowed per part when written."""
        if self.closed:
            raise ValueError("writer is closed")
        ids = np.array(example_ids, dtype=np.int64).reshape(-1)
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
        positions = position_roles(self.settings)  # mlm: cut by the offsets, the rest by example
        pos_off = np.concatenate([[0], np.cumsum(buf["lengths"])]) if positions else None
        start = 0
        while self._buffered - start >= self.part_examples or (final and self._buffered > start):
            end = min(start + self.part_examples, self._buffered)
            a, b = (int(pos_off[start]), int(pos_off[end])) if positions else (0, 0)
            arrays, extra = {}, {}
            for role in store_roles(self.settings):
                if role.rows == "example":
                    arrays[role.name] = buf[role.name][start:end]
                elif role.rows == "position":
                    arrays[role.name] = buf[role.name][a:b]
                else:  # the offsets
                    offsets = pos_off[start : end + 1] - a
                    arrays[role.name] = offsets.astype(index_dtype(int(offsets[-1])))
                    extra = {"positions": b - a}
            arrays["ids"] = arrays["ids"].astype(index_dtype(int(arrays["ids"].max())))
            self._write_part(arrays, extra)
            start = end
        a = int(pos_off[start]) if positions else 0
        self._chunks = [{key: (value[a:] if key in positions else value[start:]).copy() for key, value in buf.items()}]
        self._buffered -= start
        if self._buffered == 0:
            self._chunks = []

    def _write_part(self, arrays: dict[str, np.ndarray], extra: dict) -> None:
        part = len(self.finished)
        stem = part_stem(self.writer_id, part)
        files = {role: write_role(self.directory / f"{stem}.{role}.bin", arr) for role, arr in arrays.items()}
        ids = arrays["ids"]
        info = {
            "name": stem,
            "version": VERSION,
            "writer": self.writer_id,
            "part": part,
            **self.settings,
            "examples": int(ids.size),
            **extra,
            "id_min": int(ids.min()),
            "id_max": int(ids.max()),
            "files": files,
        }
        atomic_write_json(self.directory / f"{stem}.json", info)  # last: marks the part finished
        self.finished.append(info)


def _rows(values: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """One array with a row per example (the given array, or the per-example arrays stacked)."""
    return values if isinstance(values, np.ndarray) else np.stack(values)
