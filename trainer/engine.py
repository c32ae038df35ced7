"""DeepSpeed engine set-up shared by every training stage.

The recipe is the one source of truth for batch sizes, accumulation, clipping and the optimizer;
the named DeepSpeed config (ds_configs/) brings ZeRO stage, offload and precision. A DeepSpeed config
that sets one of the recipe's keys to another value is an error naming both files.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels import dispatch
from trainer.assets import ds_config_dir
from trainer.errors import UserError
from trainer.recipes.base import EngineSection, TrainSection

RECIPE_OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)
FORBIDDEN = ("optimizer", "scheduler")


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
        raise UserError(
            f"{where}: train.global_batch={train.global_batch} is not a multiple of "
            f"train.micro_batch x ranks = {train.micro_batch} x {world_size}"
        )
    return BatchPlan(train.micro_batch, train.global_batch // per_step, world_size)


# "auto" ZeRO sizes, as functions of the model's hidden size h. The first three are transformers' own
# (`HfTrainerDeepSpeedConfig.trainer_config_finalize`); DeepSpeed's defaults for the last four (5e8 / 1e9 elements)
# keep every parameter of a sub-billion model gathered at ZeRO-3 and allocate multi-GB buckets. A BERT layer has
# ~12 h^2 parameters, so 30 h^2 keeps about two layers live ahead and reused, and bounds the fp32 gradient copy the
# ZeRO-3 optimizer flattens per sub-group.
AUTO_SIZES: dict[str, Callable[[int], int]] = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
    "allgather_bucket_size": lambda h: 10 * h * h,
    "stage3_max_live_parameters": lambda h: 30 * h * h,
    "stage3_max_reuse_distance": lambda h: 30 * h * h,
    "sub_group_size": lambda h: 30 * h * h,
}


def resolve_auto(cfg: dict[str, Any], hidden_size: int | None, where: str) -> dict[str, Any]:
    """Fill every "auto" size in `zero_optimization` for a model of `hidden_size` (in place; -> cfg)."""
    zero = cfg.get("zero_optimization", {})
    autos = [k for k, v in zero.items() if v == "auto"]
    unknown = [k for k in autos if k not in AUTO_SIZES]
    if unknown:
        raise UserError(
            f'{where}: zero_optimization.{unknown[0]} cannot be "auto" (keys that can: {", ".join(AUTO_SIZES)})'
        )
    if autos and not hidden_size:
        raise UserError(
            f'{where}: zero_optimization.{autos[0]} is "auto" but the model\'s hidden size is unknown; give a number'
        )
    for key in autos:
        zero[key] = AUTO_SIZES[key](hidden_size)
    return cfg


def build_ds_config(
    base: dict[str, Any],
    base_path: Path,
    train: TrainSection,
    plan: BatchPlan,
    where: str = "recipe",
    hidden_size: int | None = None,
) -> dict[str, Any]:
    cfg = json.loads(json.dumps(base))
    resolve_auto(cfg, hidden_size, str(base_path))
    wanted = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": float(train.clip),
    }
    for key in FORBIDDEN:
        if key in cfg:
            raise UserError(
                f"{base_path}: key '{key}' conflicts with the recipe ({where}), which defines the "
                "optimizer and schedule in its train section; remove it from the DeepSpeed config"
            )
    for key, value in wanted.items():
        if key in cfg and cfg[key] != "auto" and float(cfg[key]) != float(value):
            raise UserError(
                f"{base_path}: key '{key}'={cfg[key]} conflicts with the recipe ({where}), which gives "
                f"{value}; remove it from the DeepSpeed config or make them equal"
            )
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
    """No weight decay on biases and LayerNorm weights (BERT convention). A parameter partitioned at construction
    (ZeRO-3) holds an empty tensor: its shape is `ds_shape`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, train: TrainSection, ds_cfg: dict[str, Any]) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay)
    kw = dict(lr=train.lr, betas=tuple(train.betas), eps=train.eps)
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offload and torch.cuda.is_available():
        # deferred: deepspeed (1-3 s) only with a CPU-offloaded optimizer
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


def configure_kernels(engine: EngineSection) -> None:
    """Apply a recipe's engine section to the kernel dispatch (the only link between recipes and kernels/)."""
    dispatch.configure(use_triton=engine.kernels, compile_reference=engine.compile_reference)


def model_hidden_size(model: torch.nn.Module) -> int | None:
    """hidden_size of the first Hugging Face config found in the module tree (what "auto" sizes follow)."""
    for module in model.modules():
        size = getattr(getattr(module, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    return None


def engine_config(
    ds_name: str, train: TrainSection, world_size: int, where: str, hidden_size: int | None
) -> tuple[dict[str, Any], BatchPlan]:
    """The DeepSpeed config a stage runs with, resolved before the model exists (ZeRO-3 builds the model
    partitioned from it): the recipe's batch keys merged in and every "auto" size filled for `hidden_size`."""
    base, path = load_ds_config(ds_name)
    plan = batch_plan(train, world_size, where)
    cfg = build_ds_config(base, path, train, plan, where, hidden_size)
    if precision(cfg) == torch.float16 and not torch.cuda.is_available():
        raise UserError(f"{path}: fp16 needs a GPU; on CPU use the fp32 config (e.g. zero2)")
    return cfg, plan


@contextlib.contextmanager
def partitioned_construction(ds_cfg: dict[str, Any]) -> Iterator[None]:
    """Inside, Hugging Face models built with `from_config` / `from_pretrained` are partitioned over the ranks
    as each module is created (ZeRO-3 only; a no-op at stages 0-2), so no rank ever holds the whole model.

    This is transformers' own DeepSpeed integration (`HfDeepSpeedConfig` -> `deepspeed.zero.Init`, weights
    initialised or loaded module by module under `GatheredParameters`). Constructing a model class directly
    (`BertForMaskedLM(cfg)`) bypasses it: build with `from_config` / `_from_config` instead.
    """
    if zero_stage(ds_cfg) != 3:
        yield
        return
    follow_live_memory()
    # deferred: deepspeed (1-3 s) and its transformers hooks only under ZeRO-3
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if not deepspeed.comm.is_initialized():  # zero.Init reads the world size from deepspeed.comm
        deepspeed.init_distributed(
            dist_backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            auto_mpi_discovery=False,
        )
    keep = HfDeepSpeedConfig(ds_cfg)  # transformers holds only a weak reference: keep it alive while inside
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def build_model(fn: Callable[[], torch.nn.Module], ds_cfg: dict[str, Any]) -> torch.nn.Module:
    """`fn()` under `partitioned_construction(ds_cfg)`, then the build's scratch memory handed back to the OS."""
    with partitioned_construction(ds_cfg):
        model = fn()
    release_host_memory(collect=True)
    return model


def initialize(
    model: torch.nn.Module,
    train: TrainSection,
    ds_name: str,
    world_size: int,
    where: str,
    ds_cfg: dict[str, Any] | None = None,
):
    """-> (DeepSpeed engine, resolved DeepSpeed config, batch plan). Pass `ds_cfg` from `engine_config` when the
    model was built with `build_model` (the same config must partition and train it)."""
    # deferred: deepspeed (1-3 s) only when an engine is built (label, evaluate-mlm import this module without one)
    import deepspeed

    if ds_cfg is None:
        ds_cfg, plan = engine_config(ds_name, train, world_size, where, model_hidden_size(model))
    else:
        plan = batch_plan(train, world_size, where)
    optimizer = make_optimizer(model, train, ds_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if zero_stage(ds_cfg) == 3 or offloads(ds_cfg):
        follow_live_memory()
        _release_after_updates(engine)
    release_host_memory(collect=True)
    return engine, ds_cfg, plan


def describe_engine(engine) -> str:
    """What DeepSpeed really runs, read from the engine rather than the config: the dtype of the module's
    parameters (the forward's precision) and what ZeRO keeps on the CPU. Logged at start (tests read it)."""
    dtype = str(next(engine.module.parameters()).dtype).removeprefix("torch.")
    zero = engine.optimizer  # the ZeRO optimizer sets these flags when it accepts an offload section
    offloaded = [
        what
        for what, on in (
            ("optimizer state", getattr(zero, "offload_optimizer", False) or getattr(zero, "cpu_offload", False)),
            ("parameters", getattr(zero, "offload_param", False)),
        )
        if on
    ]
    return f"parameters {dtype}" + (f", offloaded to CPU: {' and '.join(offloaded)}" if offloaded else "")


def _release_after_updates(engine) -> None:
    """Every ZeRO-3 step gathers and frees whole layers (offload stages them through host memory): hand the
    freed pages back after each update, so the resident set follows live memory, not its high-water mark.
    One `malloc_trim` per optimizer step costs milliseconds against steps of a model large enough for ZeRO-3."""
    step = engine.step

    def step_and_release(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        out = step(*args, **kwargs)
        if boundary:
            release_host_memory()
        return out

    engine.step = step_and_release


def offloads(cfg: dict[str, Any]) -> bool:
    zero = cfg.get("zero_optimization", {})
    return any(zero.get(k, {}).get("device") in ("cpu", "nvme") for k in ("offload_optimizer", "offload_param"))


_LIBC: Any = None
M_MMAP_THRESHOLD = -3  # glibc mallopt() parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def follow_live_memory() -> bool:
    """Serve every host allocation of 1 MiB or more with its own mmap, returned to the OS when freed (glibc
    `mallopt(M_MMAP_THRESHOLD)`, which also stops glibc raising that threshold to 32 MB after large frees).

    A ZeRO-3 step allocates and frees every gathered layer, gradient bucket and activation; from glibc's heap
    those come back as fragmented free chunks, so the resident set grows past live memory by ~1 GB per rank on
    bert-large (measured: docs/benchmarks.md). The cost is page faults on fresh mappings, small beside the
    collectives of a ZeRO-3 step. Set for ZeRO-3 and offload runs only; `MALLOC_MMAP_THRESHOLD_=1048576` in the
    environment does the same for any run from process start. False where the C library is not glibc."""
    libc = _libc()
    return bool(libc) and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_host_memory(collect: bool = False) -> bool:
    """Return freed heap pages to the OS (glibc `malloc_trim(0)`); False where the C library has no such call.

    glibc keeps freed memory in its arenas (and raises its mmap threshold up to 32 MB after a large free),
    so without this the resident set of a ZeRO-3 rank keeps the high-water mark of every gather and build
    scratch buffer, and a host that runs several ranks (or CPU offload) runs out long before live memory does.
    Called where gathers end: after the model build, engine set-up, every ZeRO-3/offload update and export.
    """
    libc = _libc()
    if not libc:
        return False
    if collect:  # drop cycles first (a model built and discarded), so their storages are freed before the trim
        gc.collect()
    libc.malloc_trim(0)
    return True


def grad_norm(engine) -> float | None:
    """Global gradient norm before clipping; call after the last backward of a step, before step()."""
    if engine.zero_optimization():
        return None  # ZeRO computes it inside step(); read engine.get_global_grad_norm() afterwards
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
