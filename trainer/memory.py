"""Memory per rank: a planner for picking a ZeRO stage before a job is submitted, and the probes that check it.

Planner (`plan`, `wellread plan-memory`): model states per rank for each ZeRO stage, with DeepSpeed's own
estimators where they apply (mixed precision, `estimate_zero2/3_model_states_mem_needs`) and, for fp32
training, which they do not model, the byte counts DeepSpeed actually allocates (Psi = parameters, N = ranks):

    stage 0   16 Psi                      fp32 params 4 + grads 4 + Adam moments 8
    stage 1-2 4 Psi + 16 Psi/N            full params; grads 4, master copy 4 and moments 8 partitioned
    stage 3   20 Psi/N                    everything partitioned

(Measured with tools/bench/zero_memory.py: DeepSpeed 0.19's stage 1 reduces gradients into the same
partitioned buffer as stage 2, so between steps it holds what stage 2 holds.)

plus activations for the batch and sequence length (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models": s*b*h*(34 + 5*a*s/h) bytes per layer at 16 bits, twice that in fp32).

Probes (used by tools/bench/zero_memory.py and the tests): model-state bytes counted from the unique tensor
storages a process holds, resident set size and its high-water mark, and `Materialized`, which records the
most full-size parameter elements a rank held at once.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.errors import UserError

GIB = 1024**3


# ---------------------------------------------------------------------------------------------- planner
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter count, largest single tensor, and the transformer dimensions."""

    params: int
    largest_param: int
    layers: int
    hidden: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, name: str, vocab_size: int | None = None) -> ModelShape:
        """Exact counts from the model built on the meta device (no memory, no weights read)."""
        # deferred: torch/transformers only for exact counts; the planner is torch-free (plan-memory, check)
        import torch
        from transformers import BertForMaskedLM

        from trainer.models.zoo import DEFAULT_VOCAB_SIZE, bert_config

        cfg = bert_config(name, vocab_size=vocab_size or DEFAULT_VOCAB_SIZE)
        with torch.device("meta"):
            model = BertForMaskedLM(cfg)
        unique = {id(p): p.numel() for p in model.parameters()}  # the tied decoder weight once
        return cls(
            sum(unique.values()),
            max(unique.values()),
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.vocab_size,
        )


@dataclass
class StagePlan:
    stage: int
    device_gib: float  # per rank: accelerator memory (GPU), or host memory on a CPU-only run
    host_gib: float  # per rank: host memory for offloaded states (0 without offload)
    model_states_gib: float  # params + grads + optimizer states held per rank (device + host)
    activations_gib: float
    source: str  # which estimate: DeepSpeed's estimator or the fp32 formula


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str) -> int:
    """Activations kept for backward: Korthikanti et al.'s per-layer s*b*h*(34 + 5*a*s/h) bytes (16-bit, with
    dropout masks), x2 for fp32 tensors, plus the embedding output and the sparse MLM head (15% of positions)."""
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    per_layer = s * b * h * (34 + 5 * a * s / h)
    width = 2 if precision == "fp32" else 1
    head = 0.15 * s * b * (2 * h + shape.vocab) * 4  # transform + logits chunk, fp32 in the loss
    return int(width * (shape.layers * per_layer + 2 * s * b * h) + head)


def fp32_model_state_bytes(params: int, stage: int, ranks: int) -> int:
    """fp32 training (DeepSpeed keeps an fp32 master partition beside the fp32 parameters at stages 1-3)."""
    n = ranks
    per_param = {0: 16, 1: 4 + 16 / n, 2: 4 + 16 / n, 3: 20 / n}[stage]
    return int(per_param * params)


def plan(
    shape: ModelShape,
    ranks: int,
    stages: tuple[int, ...] = (0, 1, 2, 3),
    offload: str = "none",
    precision: str = "fp32",
    micro_batch: int = 8,
    seq_len: int = 128,
    ranks_per_node: int | None = None,
) -> list[StagePlan]:
    """Per-rank memory for each ZeRO stage. `offload`: none | optimizer | all (optimizer + params, stage 3)."""
    if ranks < 1:
        raise UserError(f"--ranks must be at least 1, got {ranks}")
    if offload not in ("none", "optimizer", "all"):
        raise UserError(f"--offload must be none, optimizer or all, got '{offload}'")
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be fp32, bf16 or fp16, got '{precision}'")
    per_node = ranks_per_node or ranks
    if ranks % per_node:
        raise UserError(f"--ranks {ranks} is not a multiple of --ranks-per-node {per_node}")
    nodes = ranks // per_node
    act = activation_bytes(shape, micro_batch, seq_len, precision)
    psi, n = shape.params, ranks
    rows = []
    for stage in stages:
        if offload != "none" and stage < 2:
            raise UserError(f"offload needs ZeRO stage 2 or 3 (asked for stage {stage})")
        if offload == "all" and stage != 3:
            raise UserError(f"parameter offload needs ZeRO stage 3 (asked for stage {stage})")
        host = 0
        if precision == "fp32":
            states = fp32_model_state_bytes(psi, stage, n)
            device = states
            if offload != "none":  # fp32 grads, master and moments of the partition go to the host
                host = 16 * psi // n
                device = states - host if stage == 3 else 4 * psi
                if offload == "all":
                    host, device = states, 0
            source = "fp32 formula"
        elif stage == 0:
            # DeepSpeed has no estimator for it: 16-bit params and grads, fp32 master + moments (12 Psi)
            states = device = 16 * psi
            source = "mixed-precision formula"
        elif stage in (1, 2):  # stage 1 runs stage 2's code path and buffers (see the module docstring)
            # deferred: deepspeed (1-3 s) only for its ZeRO-1/2 estimate; the planner stays light
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            cpu, gpu = estimate_zero2_model_states_mem_needs(
                psi, per_node, nodes, cpu_offload=offload != "none", additional_buffer_factor=1.0
            )
            device, host = gpu, cpu // per_node if offload != "none" else 0
            states = device + host
            source = "deepspeed estimate_zero2_model_states_mem_needs"
        else:
            # deferred: deepspeed (1-3 s) only for its ZeRO-3 estimate
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                psi,
                shape.largest_param,
                per_node,
                nodes,
                cpu_offload=offload != "none",
                cpu_offload_params=offload == "all",
                zero_init=True,
                additional_buffer_factor=1.0,
            )
            device, host = gpu, cpu // per_node if offload != "none" else 0
            states = device + host
            source = "deepspeed estimate_zero3_model_states_mem_needs"
        rows.append(StagePlan(stage, (device + act) / GIB, host / GIB, states / GIB, act / GIB, source))
    return rows


def format_plan(
    name: str,
    shape: ModelShape,
    ranks: int,
    rows: list[StagePlan],
    offload: str,
    precision: str,
    micro_batch: int,
    seq_len: int,
) -> str:
    lines = [
        f"{name}: {shape.params / 1e6:.1f}M parameters (largest tensor {shape.largest_param / 1e6:.1f}M), "
        f"{ranks} rank(s), {precision}, offload {offload}, micro batch {micro_batch} x {seq_len} tokens",
        f"{'stage':>5} {'per-rank device':>16} {'per-rank host':>14} {'model states':>13} {'activations':>12}"
        "   estimate",
    ]
    for r in rows:
        lines.append(
            f"{r.stage:>5} {r.device_gib:>13.2f} GB {r.host_gib:>11.2f} GB {r.model_states_gib:>10.2f} GB "
            f"{r.activations_gib:>9.2f} GB   {r.source}"
        )
    lines.append(
        "device = model states on the accelerator + activations (host memory on CPU-only runs); "
        "add ~1 GB per rank for the framework itself"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- probes
def tensor_storage_bytes() -> int:
    """Bytes of the unique tensor storages alive in this process (a view of a flat buffer counts once: DeepSpeed's
    parameters, gradients and partitions are views of a few flat buffers). Call between steps for model states."""
    # deferred: torch: the probes run inside training; the planner half of this module is torch-free
    import torch

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # sparse/nested layouts, dead weak proxies
            continue
    seen.pop(0, None)  # empty storages
    return sum(seen.values())


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since the process started (VmHWM)."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux: `5` into /proc/self/clear_refs), to measure one phase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Materialized:
    """Records, per phase, the most full-size parameter elements this rank held at once.

    A parameter counts its full size while its `.data` holds the whole tensor: always without ZeRO-3, and at
    ZeRO-3 between a gather and its release (a partitioned parameter's `.data` is empty; its shard lives in
    `ds_tensor` and does not count). Sampled when a parameter is registered (model build), after every module's
    forward, after every DeepSpeed fetch (forward and backward) and `GatheredParameters` entry (init, export),
    and by a 5 ms background sampler for anything in between.
    """

    total: int = 0  # parameters of the model being watched (set by `watch`)
    peaks: dict[str, int] = field(default_factory=dict)
    phase: str = "build"
    _params: Any = None
    _handles: list = field(default_factory=list)
    _restore: list = field(default_factory=list)
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    def current(self) -> int:
        return sum(p.data.numel() for p in list(self._params.values()) if not p.is_meta)

    def sample(self) -> None:
        value = self.current()
        if value > self.peaks.get(self.phase, -1):
            self.peaks[self.phase] = value

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self.phase = phase
        self.sample()
        try:
            yield
        finally:
            self.sample()

    def fractions(self) -> dict[str, float]:
        return {k: v / self.total for k, v in self.peaks.items()} if self.total else {}

    def start(self) -> Materialized:
        # deferred: deepspeed/torch: the probes run inside training; the planner is torch-free
        import deepspeed
        import torch
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        self._params = weakref.WeakValueDictionary()  # id -> parameter (a WeakSet would compare tensors)

        def on_register(module, name, param):
            if param is not None:
                self._params[id(param)] = param
                self.sample()
            return None

        self._handles = [
            torch.nn.modules.module.register_module_parameter_registration_hook(on_register),
            torch.nn.modules.module.register_module_forward_hook(lambda *_: self.sample()),
        ]
        fetch = PartitionedParameterCoordinator.fetch_sub_module
        enter = deepspeed.zero.GatheredParameters.__enter__

        def fetch_and_sample(coordinator, *args, **kwargs):
            out = fetch(coordinator, *args, **kwargs)
            self.sample()
            return out

        def enter_and_sample(ctx):
            out = enter(ctx)
            self.sample()
            return out

        PartitionedParameterCoordinator.fetch_sub_module = fetch_and_sample
        deepspeed.zero.GatheredParameters.__enter__ = enter_and_sample
        self._restore = [
            (PartitionedParameterCoordinator, "fetch_sub_module", fetch),
            (deepspeed.zero.GatheredParameters, "__enter__", enter),
        ]
        self._stop = threading.Event()

        def sampler():
            while not self._stop.wait(0.005):
                with contextlib.suppress(RuntimeError):  # the set changed size while a build adds parameters
                    self.sample()

        self._thread = threading.Thread(target=sampler, daemon=True, name="materialized-sampler")
        self._thread.start()
        return self

    def watch(self, model) -> None:
        """Count exactly `model`'s parameters (also those made before `start`), and take its size as the total."""
        unique = {id(p): p for p in model.parameters()}
        self._params.update(unique)
        self.total = sum(getattr(p, "ds_numel", p.numel()) for p in unique.values())

    def stop(self) -> dict[str, Any]:
        # Joined, not only signalled: a sampler still reading `p.data` while the process group and the interpreter
        # tear down aborted a CI run ("terminate called without an active exception").
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for handle in self._handles:
            handle.remove()
        for owner, name, original in self._restore:
            setattr(owner, name, original)
        self._handles, self._restore = [], []
        return {"total": self.total, "peaks": dict(self.peaks), "fractions": self.fractions()}


def as_dict(rows: list[StagePlan]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
