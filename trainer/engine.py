"""DeepSpeed engine set-up shared by every training stage.

The recipe is the one source of truth for batch sizes, accumulation, clipping and the optimizer;
the named DeepSpeed config (ds_configs/) brings ZeRO stage, offload and precision. A DeepSpeed config
that sets one of the recipe's keys to another value is an error naming both files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.recipe import TrainSection

RECIPE_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping")
FORBIDDEN = ("optimizer", "scheduler")


def ds_config_dir() -> Path:
    return Path(os.environ.get("WELLREAD_DS_CONFIGS", Path(__file__).resolve().parents[1] / "ds_configs"))


def load_ds_config(name_or_path: str) -> tuple[dict[str, Any], Path]:
    path = Path(name_or_path)
    if not path.suffix:
        path = ds_config_dir() / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in ds_config_dir().glob("*.json"))
        raise UserError(f"{path}: DeepSpeed config not found (named configs: {', '.join(names)})")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    accumulation: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size


def batch_plan(train: TrainSection, world_size: int, where: str = "recipe") -> BatchPlan:
    per_step = train.micro_batch * world_size
    if train.global_batch % per_step:
        raise UserError(f"{where}: train.global_batch={train.global_batch} is not a multiple of "
                        f"train.micro_batch x ranks = {train.micro_batch} x {world_size}")
    return BatchPlan(train.micro_batch, train.global_batch // per_step, world_size)


def build_ds_config(base: dict[str, Any], base_path: Path, train: TrainSection, plan: BatchPlan,
                    where: str = "recipe") -> dict[str, Any]:
    cfg = json.loads(json.dumps(base))
    wanted = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": float(train.clip),
    }
    for key in FORBIDDEN:
        if key in cfg:
            raise UserError(f"{base_path}: key '{key}' conflicts with the recipe ({where}), which defines the "
                            "optimizer and schedule in its train section; remove it from the DeepSpeed config")
    for key, value in wanted.items():
        if key in cfg and cfg[key] != "auto" and float(cfg[key]) != float(value):
            raise UserError(f"{base_path}: key '{key}'={cfg[key]} conflicts with the recipe ({where}), which gives "
                            f"{value}; remove it from the DeepSpeed config or make them equal")
        cfg[key] = value
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero.get("offload_optimizer", {}).get("device") == "cpu" and torch.cuda.is_available() is False:
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


def precision(cfg: dict[str, Any]) -> torch.dtype:
    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that refuses a non-finite update. DeepSpeed reads `overflow` to count the skipped step and
    hold the LR schedule (ZeRO stages and fp16 check overflow themselves; this covers fp32 stage 0)."""

    overflow = False

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)))  # one pass
        self.overflow = not finite
        if not finite:
            return None
        return super().step(closure)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (BERT convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, train: TrainSection, ds_cfg: dict[str, Any]) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay)
    kw = dict(lr=train.lr, betas=tuple(train.betas), eps=train.eps)
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return GuardedAdamW(groups, fused=True, **kw)  # one multi-tensor kernel: ~8x faster steps on CPU too


def warmup_steps(train: TrainSection) -> int:
    return train.warmup_steps if train.warmup_steps is not None else int(math.ceil(train.warmup_ratio * train.steps))


def lr_lambda(train: TrainSection):
    warm = warmup_steps(train)
    total = train.steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if train.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def initialize(model: torch.nn.Module, train: TrainSection, ds_name: str, world_size: int, where: str):
    """-> (DeepSpeed engine, resolved DeepSpeed config, batch plan)."""
    import deepspeed

    base, path = load_ds_config(ds_name)
    plan = batch_plan(train, world_size, where)
    cfg = build_ds_config(base, path, train, plan, where)
    dtype = precision(cfg)
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise UserError(f"{path}: fp16 needs a GPU; on CPU use the fp32 config (e.g. zero2)")
    optimizer = make_optimizer(model, train, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
    return engine, cfg, plan


def grad_norm(engine) -> float | None:
    """Global gradient norm before clipping; call after the last backward of a step, before step()."""
    if engine.zero_optimization():
        return None  # ZeRO computes it inside step(); read engine.get_global_grad_norm() afterwards
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
