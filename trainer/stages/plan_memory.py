"""`wellread plan-memory --model NAME --ranks N [--stage S] [--offload ...] [--precision ...]`: per-rank memory
for each ZeRO stage, to pick a `ds_config` before submitting a job (see trainer/memory.py for the estimates).

A recipe (`--recipe R.yaml`) supplies the model, micro batch and ds_config (stage, offload, precision);
flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="take model, micro batch and ds_config from this recipe")
    p.add_argument("--model", default=None, help="preset, alias or Hugging Face directory (default: the recipe's)")
    p.add_argument("--ranks", type=int, required=True, help="data-parallel ranks (GPUs, or processes on CPU)")
    p.add_argument("--ranks-per-node", type=int, default=None, help="for host memory with offload (default: all)")
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=None, help="one stage (default: all)")
    p.add_argument("--offload", choices=("none", "optimizer", "all"), default=None)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=None, help="for presets (default 30522)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _from_recipe(path: str) -> dict:
    """model, micro batch and the ds_config's stage / offload / precision, read from a recipe YAML."""
    # deferred: yaml and the engine (torch) only when planning from a recipe
    import yaml

    from trainer.engine import load_ds_config, precision, zero_stage

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: recipe not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    out: dict = {}
    if (raw.get("model") or {}).get("name"):
        out["model"] = raw["model"]["name"]
    if (raw.get("train") or {}).get("micro_batch"):
        out["micro_batch"] = int(raw["train"]["micro_batch"])
    ds_name = (raw.get("engine") or {}).get("ds_config", "zero2")
    cfg, _ = load_ds_config(ds_name)
    zero = cfg.get("zero_optimization", {})
    out["stage"] = zero_stage(cfg)
    dev = lambda k: (zero.get(k) or {}).get("device", "none")  # noqa: E731
    out["offload"] = (
        "all" if dev("offload_param") != "none" else "optimizer" if dev("offload_optimizer") != "none" else "none"
    )
    out["precision"] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[str(precision(cfg)).split(".")[-1]]
    return out


def main(args: argparse.Namespace) -> int:
    # deferred: command entry; the planner loads only when `wellread plan-memory` runs (keeps its --help fast)
    from trainer.memory import ModelShape, as_dict, format_plan, plan

    recipe = _from_recipe(args.recipe) if args.recipe else {}
    model = args.model or recipe.get("model")
    if not model:
        raise UserError("give --model (or --recipe with model.name)")
    stage = args.stage if args.stage is not None else (recipe.get("stage") if args.recipe else None)
    offload = args.offload or recipe.get("offload", "none")
    precision = args.precision or recipe.get("precision", "fp32")
    micro_batch = args.micro_batch or recipe.get("micro_batch", 8)
    stages = (
        (stage,)
        if stage is not None
        else ((2, 3) if offload == "optimizer" else (3,) if offload == "all" else (0, 1, 2, 3))
    )
    shape = ModelShape.of(model, args.vocab_size)
    rows = plan(shape, args.ranks, stages, offload, precision, micro_batch, args.seq_len, args.ranks_per_node)
    if args.json:
        print(
            json.dumps(
                {
                    "model": model,
                    "params": shape.params,
                    "ranks": args.ranks,
                    "offload": offload,
                    "precision": precision,
                    "micro_batch": micro_batch,
                    "seq_len": args.seq_len,
                    "stages": as_dict(rows),
                },
                indent=1,
            )
        )
    else:
        print(format_plan(model, shape, args.ranks, rows, offload, precision, micro_batch, args.seq_len))
    return 0
