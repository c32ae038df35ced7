"""Reading a wellread checkpoint as a model (the zoo and the classifiers start from one): where the latest step
is, whether a directory is a checkpoint, its full fp32 weights at any ZeRO stage, and a Hugging Face copy.

Writing checkpoints (save, resume, export) is trainer/checkpoint.py's; this is the read side it shares, kept on
the models floor so that loading a model never imports the training machinery.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer.errors import UserError
from trainer.fileio import read_json

LATEST = "latest.json"


def latest(root: Path) -> dict[str, Any] | None:
    path = Path(root) / LATEST
    return read_json(path, "checkpoint pointer") if path.is_file() else None


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "rank-00000.json").is_file()


def model_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the Hugging Face model inside a checkpoint of any ZeRO stage."""
    step_dir = Path(step_dir)
    if any(step_dir.glob("zero_pp_rank_*_optim_states.pt")):
        # deferred: deepspeed (1-3 s) only for a checkpoint with ZeRO shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:  # ZeRO stage 0: the whole module is in the model-states file (tensors and plain containers only)
        state = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    prefix = "hf."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def to_hf_dir(step_dir: Path, dest: Path) -> Path:
    """Materialise a checkpoint as a Hugging Face directory (config, safetensors weights, tokenizer)."""
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
