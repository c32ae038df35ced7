"""Checkpoints for every stage: DeepSpeed state + every rank's RNG and data cursor, published atomically.

    OUT/checkpoints/
        latest.json          {"tag": "step-0000500", "step": 500, "world_size": 2}; replaced atomically
        step-0000500/        DeepSpeed's files (model, optimizer shards, LR scheduler, client state)
                             + rank-00000.json ... one per rank: RNG states, data cursor, counters

A save goes to `.tmp-step-...`; only when every rank has written its part does rank 0 fsync the files,
rename the directory to its final name and then repoint latest.json. A save killed half-way leaves
the previous checkpoint and latest.json untouched; the leftover temp directory is removed next time.
DeepSpeed's own `client_state` holds rank 0's view only, hence the per-rank files.

A stage never calls these functions directly: the `Checkpointer` decides when to save (periodic, last
step, pre-emption), resumes, and exports (`OUT/export` and `OUT/best` are published by swapping a
symlink, so a valid export exists at every instant, including during its replacement).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.engine import release_host_memory
from trainer.errors import UserError
from trainer.fileio import (
    TMP_SUFFIX,
    atomic_rename_dir,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    read_json,
)
from trainer.launcher import DistEnv, barrier
from trainer.models.checkpoints import LATEST, latest


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def save(
    engine,
    root: Path,
    step: int,
    env: DistEnv,
    rank_state: dict[str, Any],
    client_state: dict[str, Any],
    keep: int = 2,
    pause_before_publish: float = 0.0,
    files: dict[str, str] | None = None,
) -> Path:
    """Collective: every rank must call it at the same step. `files` (name -> text, written by rank 0) make
    the directory self-describing: the model's config.json and tokenizer.json, so it can seed a later stage."""
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    pointer = latest(root)
    if pointer is not None and pointer.get("step") == step and (root / tag / f"rank-{env.rank:05d}.json").is_file():
        # Re-saving a published step (a signal right after a periodic save): nothing has changed since
        # (no update, no random draw), so the published checkpoint is kept rather than replaced, which
        # would leave latest.json pointing at a directory being swapped.
        barrier()
        return root / tag
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={**client_state, "step": step}, save_latest=False)
    atomic_write_json(
        root / tmp_tag / f"rank-{env.rank:05d}.json", {**rank_state, "rng": rng_state(), "rank": env.rank, "step": step}
    )
    if env.is_main:
        for name, text in (files or {}).items():
            atomic_write_bytes(root / tmp_tag / name, text.encode())
    barrier()
    if pause_before_publish:
        time.sleep(pause_before_publish)
    if env.is_main:
        fsync_tree(root / tmp_tag)
        final = root / tag
        if final.exists():  # an unpublished leftover of a save killed between rename and latest.json
            shutil.rmtree(final)
        _crash_point("before_publish")
        atomic_rename_dir(root / tmp_tag, final)
        _crash_point("before_latest")
        atomic_write_json(root / LATEST, {"tag": tag, "step": step, "world_size": env.world_size})
        _crash_point("before_prune")
        _prune(root, keep)
    barrier()
    return root / tag


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load(engine, root: Path, env: DistEnv) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Restore the engine, this rank's RNG; -> (client_state, this rank's state), or None if no checkpoint."""
    pointer = latest(root)
    if pointer is None:
        return None
    tag = pointer["tag"]
    if pointer.get("world_size") != env.world_size:
        raise UserError(
            f"{Path(root) / LATEST}: checkpoint {tag} was written by {pointer.get('world_size')} ranks, "
            f"this run has {env.world_size}; resume with the same number of ranks"
        )
    rank_file = Path(root) / tag / f"rank-{env.rank:05d}.json"
    rank_state = read_json(rank_file, "rank checkpoint state")
    path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{Path(root) / tag}: DeepSpeed could not load this checkpoint")
    set_rng_state(rank_state["rng"])
    return client or {}, rank_state


def export_hf(
    engine, hf_model, tokenizer, out_dir: Path, env: DistEnv, extra_files: dict[str, Any] | None = None
) -> Path:
    """Collective: write a Hugging Face directory (safetensors + config + tokenizer) atomically from rank 0.

    At ZeRO-3 no rank ever holds the whole model: the weights are gathered one tensor at a time and streamed
    into `model.safetensors` by rank 0 (`_stream_safetensors`); the other stages hold full weights anyway and
    use `save_pretrained`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if engine.zero_optimization_stage() == 3:
        if env.is_main:
            tmp.mkdir(parents=True)
            hf_model.config.architectures = [type(hf_model).__name__]  # what save_pretrained records
            hf_model.config.save_pretrained(tmp)
        _stream_safetensors(hf_model, tmp / "model.safetensors", env.is_main)

        release_host_memory()
    elif env.is_main:
        hf_model.save_pretrained(tmp, safe_serialization=True)
    if env.is_main:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        fsync_tree(tmp)
        publish_dir(tmp, out_dir)
    barrier()
    return out_dir


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def export_entries(hf_model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what `save_pretrained` writes: persistent state, each tied tensor once under its first name
    (`bert.embeddings.word_embeddings.weight`, not the tied `cls.predictions.decoder.weight`)."""
    seen: set[int] = set()
    entries = []
    for name, tensor in hf_model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries.append((name, tensor))
    return entries


def _stream_safetensors(hf_model: torch.nn.Module, path: Path, write: bool) -> None:
    """Collective (ZeRO-3): write `path` in the safetensors format, gathering one tensor at a time.

    Hand-written because `safetensors.torch.save_file` needs the whole state dict in memory at once, which is
    what ZeRO-3 exists to avoid. The format is an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range, then the raw bytes; the shapes are known before any gather (`ds_shape`),
    so the header goes first and each tensor's bytes follow as soon as it is gathered. Tests load the result with
    the safetensors library and compare it with `save_pretrained`'s file."""
    # deferred: deepspeed (1-3 s) only for a ZeRO-3 export
    import deepspeed

    entries = export_entries(hf_model)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in entries:
        shape = list(getattr(tensor, "ds_shape", tensor.shape))
        nbytes = int(np.prod(shape, dtype=np.int64)) * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the library writes it
    f = open(path, "wb") if write else None
    try:
        if f is not None:
            f.write(len(head).to_bytes(8, "little") + head)
        for _, tensor in entries:
            partitioned = hasattr(tensor, "ds_id")
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=partitioned):
                if f is not None:
                    data = tensor.detach().contiguous().cpu()
                    f.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
                    del data
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
    finally:
        if f is not None:
            f.close()


def publish_dir(tmp: Path, dest: Path) -> Path:
    """Make `dest` show the finished directory `tmp`, so that `dest` is complete at every instant.

    `dest` is a relative symlink to a versioned sibling (`.NAME.v<ns>`); the new version is renamed into
    place first, then a new link replaces the old one with rename(2), which is atomic, and only then is
    the old version deleted. Readers (`from_pretrained(dest)`) see the old or the new model, never a
    gap. A `dest` that is a plain directory (written by an older wellread) is moved aside once.
    """
    tmp, dest = Path(tmp), Path(dest)
    version = dest.with_name(f".{dest.name}.v{time.time_ns()}")
    atomic_rename_dir(tmp, version)
    _crash_point("export_before_link")
    if dest.is_dir() and not dest.is_symlink():
        legacy = dest.with_name(f".{dest.name}.v0")
        shutil.rmtree(legacy, ignore_errors=True)
        os.replace(dest, legacy)
    link = dest.with_name(f".{dest.name}.link{TMP_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(version.name, link)
    os.replace(link, dest)
    fsync_dir(dest.parent)
    _crash_point("export_before_cleanup")
    for stale in dest.parent.glob(f".{dest.name}.v*"):  # the previous version and any a crash left
        if stale != version:
            shutil.rmtree(stale, ignore_errors=True)
    return dest


_crash_counts: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Fault injection for the atomicity tests: WELLREAD_CRASH_AT=<name>[@k] kills the process the k-th
    time (default 1st) it gets here, as a power cut or SIGKILL would."""
    want, _, nth = os.environ.get("WELLREAD_CRASH_AT", "").partition("@")
    if want == name:
        _crash_counts[name] = _crash_counts.get(name, 0) + 1
        if _crash_counts[name] == int(nth or 1):
            os._exit(137)


class Checkpointer:
    """Owns when a stage saves, resumes and exports; the training loop only reports where it is.

    `save(step, last_step=...)` decides for itself: every `every` steps, at the last step, or when
    `force`d (pre-emption). State is the loop's client dict plus one dict per rank.
    """

    def __init__(
        self,
        root: Path,
        env: DistEnv,
        every: int = 0,
        keep: int = 2,
        pause: float = 0.0,
        files: dict[str, str] | None = None,
    ):
        self.root, self.env, self.every, self.keep, self.pause = Path(root), env, every, keep, pause
        self.files = files or {}  # config.json / tokenizer.json: a checkpoint can seed a later stage

    def due(self, step: int, last_step: bool = False, force: bool = False) -> bool:
        return force or last_step or (bool(self.every) and step % self.every == 0)

    def save(
        self,
        engine,
        step: int,
        client: dict[str, Any],
        rank_state: dict[str, Any],
        *,
        last_step: bool = False,
        force: bool = False,
    ) -> Path | None:
        """Collective. Saves if due; -> the published directory, or None when not due."""
        if not self.due(step, last_step, force):
            return None
        return save(engine, self.root, step, self.env, rank_state, client, self.keep, self.pause, self.files)

    def resume(self, engine) -> tuple[dict[str, Any], dict[str, Any]] | None:
        return load(engine, self.root, self.env)

    def export(self, engine, hf_model, tokenizer, dest: Path, info: dict[str, Any]) -> Path:
        """Collective: the Hugging Face directory `dest` (+ wellread.json), replaced atomically."""
        return export_hf(engine, hf_model, tokenizer, dest, self.env, {"wellread.json": info})
