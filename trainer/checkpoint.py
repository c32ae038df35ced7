"""Checkpoints for every stage: DeepSpeed state + every rank's RNG and data cursor, published atomically.

    OUT/checkpoints/
        latest.json          {"tag": "step-0000500", "step": 500, "world_size": 2}; replaced atomically
        step-0000500/        DeepSpeed's files (model, optimizer shards, LR scheduler, client state)
                             + rank-00000.json ... one per rank: RNG states, data cursor, counters

A save goes to `.tmp-step-...`; only when every rank has written its part does rank 0 fsync the files,
rename the directory to its final name and then repoint latest.json. A save killed half-way leaves
the previous checkpoint and latest.json untouched; the leftover temp directory is removed next time.
DeepSpeed's own `client_state` holds rank 0's view only, hence the per-rank files.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import UserError
from trainer.fileio import atomic_rename_dir, atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from trainer.launcher import DistEnv, barrier

LATEST = "latest.json"


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


def latest(root: Path) -> dict[str, Any] | None:
    path = Path(root) / LATEST
    return read_json(path, "checkpoint pointer") if path.is_file() else None


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def save(engine, root: Path, step: int, env: DistEnv, rank_state: dict[str, Any],
         client_state: dict[str, Any], keep: int = 2, pause_before_publish: float = 0.0,
         files: dict[str, str] | None = None) -> Path:
    """Collective: every rank must call it at the same step. `files` (name -> text, written by rank 0) make
    the directory self-describing: the model's config.json and tokenizer.json, so it can seed a later stage."""
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={**client_state, "step": step}, save_latest=False)
    atomic_write_json(root / tmp_tag / f"rank-{env.rank:05d}.json",
                      {**rank_state, "rng": rng_state(), "rank": env.rank, "step": step})
    if env.is_main:
        for name, text in (files or {}).items():
            atomic_write_bytes(root / tmp_tag / name, text.encode())
    barrier()
    if pause_before_publish:
        time.sleep(pause_before_publish)
    if env.is_main:
        _fsync_tree(root / tmp_tag)
        final = root / tag
        if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        atomic_rename_dir(root / tmp_tag, final)
        atomic_write_json(root / LATEST, {"tag": tag, "step": step, "world_size": env.world_size})
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
        raise UserError(f"{Path(root) / LATEST}: checkpoint {tag} was written by {pointer.get('world_size')} ranks, "
                        f"this run has {env.world_size}; resume with the same number of ranks")
    rank_file = Path(root) / tag / f"rank-{env.rank:05d}.json"
    rank_state = read_json(rank_file, "rank checkpoint state")
    path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{Path(root) / tag}: DeepSpeed could not load this checkpoint")
    set_rng_state(rank_state["rng"])
    return client or {}, rank_state


def export_hf(engine, hf_model, tokenizer, out_dir: Path, env: DistEnv, extra_files: dict[str, Any] | None = None
              ) -> Path:
    """Collective: write a Hugging Face directory (safetensors + config + tokenizer) atomically from rank 0."""
    import deepspeed

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    params = list(hf_model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            hf_model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, obj in (extra_files or {}).items():
                atomic_write_json(tmp / name, obj)
            _fsync_tree(tmp)
            if out_dir.exists():
                old = out_dir.with_name(f".old-{out_dir.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
                atomic_rename_dir(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                atomic_rename_dir(tmp, out_dir)
    barrier()
    return out_dir


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "rank-00000.json").is_file()


def model_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the Hugging Face model inside a checkpoint of any ZeRO stage."""
    step_dir = Path(step_dir)
    if any(step_dir.glob("zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:  # ZeRO stage 0: the whole module is in the model-states file (tensors and plain containers only)
        state = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    prefix = "hf."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def to_hf_dir(step_dir: Path, dest: Path) -> Path:
    """Materialise a checkpoint as a Hugging Face directory (config, safetensors weights, tokenizer)."""
    from safetensors.torch import save_file

    step_dir = Path(step_dir)
    if not (step_dir / "config.json").is_file():
        raise UserError(f"{step_dir}: checkpoint has no config.json (written by an older wellread?)")
    dest.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in model_state_dict(step_dir).items()}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        if (step_dir / name).is_file():
            shutil.copyfile(step_dir / name, dest / name)
    return dest
