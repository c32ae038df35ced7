"""The one place that decides which implementation of a fused op runs.

* CUDA tensors, Triton importable and ``configure(use_triton=True)`` (the default): Triton kernels,
  with launch configurations chosen from the explicit table in ``kernels.triton_configs`` (so
  every possible choice is compiled ahead of time by ``kernels.aot``).
* ``TRITON_INTERPRET=1`` in the environment: the Triton kernels also run on CPU tensors, through
  Triton's interpreter (that is how they are tested without a GPU).  The variable must be set
  before the first fused op runs: Triton fixes interpreted-or-compiled when a kernel module is
  imported, and a module imported in the other mode falls back to the reference with a warning.
* Everything else (and shapes/dtypes outside the table): ``kernels.reference``, optionally
  ``torch.compile``-d (``configure(compile_reference=True)``). When Triton was wanted (CUDA tensors
  or the interpreter) but is missing or fails to import, a RuntimeWarning names the cause, once.

Models and losses call only the functions below, never a kernel module directly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from kernels import reference, triton_configs
from kernels.reference import IGNORE_INDEX, Reduction, Teacher

__all__ = [
    "Options",
    "backend_for",
    "bias_gelu",
    "configure",
    "kl_div",
    "layer_norm",
    "linear_cross_entropy",
    "linear_kl_div",
    "options",
    "soft_cross_entropy",
    "sparse_kl_div",
]

TRITON_DTYPES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Options:
    """Process-wide switches, set from the recipe config through :func:`configure`."""

    use_triton: bool = True
    compile_reference: bool = False
    chunk_rows: int | None = None  # rows per chunk of the linear losses; None = heuristic


_options = Options()


def configure(use_triton: bool = True, compile_reference: bool = False, chunk_rows: int | None = None) -> None:
    """Set the dispatch switches (call once at start-up, before the first step)."""
    global _options
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError("chunk_rows must be positive")
    _options = Options(use_triton=use_triton, compile_reference=compile_reference, chunk_rows=chunk_rows)


def options() -> Options:
    return replace(_options)


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_unavailable() -> str | None:
    """Why Triton cannot be used in this process (a sentence), or None when it imports."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401  (deferred: optional dependency, probed at run time)
    except Exception as e:  # a broken install must not take the reference path down with it
        return f"`import triton` failed with {type(e).__name__}: {e}"
    return None


def triton_importable() -> bool:
    return triton_unavailable() is None


@functools.cache
def _warn_triton_unavailable(cause: str) -> None:
    """Once per process: a GPU run on the reference path is several times slower, never silently."""
    warnings.warn(
        f"Triton kernels were requested (CUDA tensors or TRITON_INTERPRET=1) but {cause}; "
        "every fused op uses the PyTorch reference path instead",
        RuntimeWarning,
        stacklevel=5,  # op -> _triton_module -> _wants_triton -> here: point at the op's caller
    )


@functools.cache
def _kernel_module(name: str) -> ModuleType:
    return importlib.import_module(f"kernels.{name}")


@functools.cache
def _warn_mode_mismatch(name: str) -> None:
    warnings.warn(
        f"kernels.{name} was imported before TRITON_INTERPRET=1 was set; CPU tensors use the reference path",
        RuntimeWarning,
        stacklevel=3,
    )


def _wants_triton(*tensors: Tensor) -> bool:
    # device / env checked first: on CPU without the interpreter triton is never even imported
    if not _options.use_triton or not (all(t.is_cuda for t in tensors) or interpret_requested()):
        return False
    cause = triton_unavailable()
    if cause is not None:
        _warn_triton_unavailable(cause)
        return False
    return True


def _triton_module(module: str, *tensors: Tensor) -> ModuleType | None:
    """The Triton kernel module to use for these tensors, or None for the reference path."""
    if not _wants_triton(*tensors):
        return None
    mod = _kernel_module(module)
    if not mod.INTERPRETED and not all(t.is_cuda for t in tensors):
        _warn_mode_mismatch(module)
        return None
    return mod


def backend_for(*tensors: Tensor) -> str:
    """What the fused ops choose for these tensors, "triton" or "reference" (for logs and tests)."""
    return "triton" if _wants_triton(*tensors) else "reference"


_compiled: dict[str, Callable] = {}


def _ref(name: str) -> Callable:
    """The reference function ``name``, ``torch.compile``-d when configured (compiled once)."""
    fn = getattr(reference, name)
    if not _options.compile_reference:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def _dtype(t: Tensor) -> str | None:
    return TRITON_DTYPES.get(t.dtype)


# -------------------------------------------------------------------------------- ops --------


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-12) -> Tensor:
    """LayerNorm over the last dimension."""
    mod = _triton_module("triton_layer_norm", x) if weight is not None and bias is not None else None
    cfgs = triton_configs.select_layer_norm(_dtype(x) or "", x.shape[-1]) if mod is not None else None
    if mod is None or cfgs is None:
        return _ref("layer_norm")(x, weight, bias, eps)
    return mod.layer_norm(x, weight, bias, eps, *cfgs)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """Exact GELU(x + bias): the BERT intermediate activation after a bias-free matmul."""
    mod = _triton_module("triton_bias_gelu", x)
    cfgs = triton_configs.select_bias_gelu(_dtype(x) or "") if mod is not None else None
    if mod is None or cfgs is None:
        return _ref("bias_gelu")(x, bias)
    return mod.bias_gelu(x, bias, *cfgs)


def _row_mask(mask: Tensor | None, student: Tensor) -> Tensor | None:
    return mask.reshape(student.shape[:-1]).bool() if mask is not None else None


def _dense(kind: str, student: Tensor, teacher: Tensor, temperature: float, reduction: str, mask) -> Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    mask = _row_mask(mask, student)
    mod = _triton_module("triton_distillation", student, teacher)
    cfg = None if mod is None else triton_configs.select_kd_dense(_dtype(student) or "", student.shape[-1])
    if mod is None or cfg is None:
        name = "kl_div" if kind == "kl" else "soft_cross_entropy"
        return _ref(name)(student, teacher, temperature, reduction, mask)
    return mod.distill_dense(student, teacher, temperature, reduction, mask, kind, cfg)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """-sum_v p_teacher_T log q_student_T per row (mean over kept rows by default); fp32."""
    return _dense("ce", student_logits, teacher_logits, temperature, reduction, mask)


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """KL(teacher_T || student_T) summed over the vocab, mean over kept rows; caller multiplies by T^2."""
    return _dense("kl", student_logits, teacher_logits, temperature, reduction, mask)


def sparse_kl_div(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """KL against stored top-k teacher log-probs (renormalised over the k entries at temperature T)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    mask = _row_mask(mask, student_logits)
    mod = _triton_module("triton_distillation", student_logits, topk_ids, topk_logprobs)
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    cfg = None if mod is None else triton_configs.select_kd_sparse(_dtype(student_logits) or "", vocab, k)
    if mod is None or cfg is None:
        return _ref("sparse_kl_div")(student_logits, topk_ids, topk_logprobs, temperature, reduction, mask)
    return mod.distill_sparse(student_logits, topk_ids, topk_logprobs, temperature, reduction, mask, cfg)


def _linear_dtype(hidden: Tensor) -> str:
    return TRITON_DTYPES.get(reference.compute_dtype(hidden), "")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    reduction: Literal["mean", "sum"] = "mean",
    ignore_index: int = IGNORE_INDEX,
    return_correct: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` (chunked: the [N, V] logits never exist).

    With ``return_correct=True`` returns ``(loss, n_correct)``: kept rows whose argmax is the label.
    """
    mod = _triton_module("triton_cross_entropy", hidden, weight)
    cfg = None if mod is None else triton_configs.select_cross_entropy(_linear_dtype(hidden), weight.shape[0])
    op: Callable = _ref("cross_entropy_chunk_")
    if cfg is not None:
        op = functools.partial(mod.cross_entropy_chunk_, cfg=cfg)
    return reference.linear_cross_entropy(
        hidden, weight, bias, labels, reduction, ignore_index, return_correct, _options.chunk_rows, op
    )


def linear_kl_div(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: Teacher,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """KL(teacher_T || student_T) with student logits ``hidden @ weight.T + bias``, chunked.

    ``teacher``: dense teacher logits ``[N, V]`` or a ``(topk_ids, topk_logprobs)`` pair.
    """
    dense_op: Callable = _ref("kd_dense_chunk_")
    sparse_op: Callable = _ref("kd_sparse_chunk_")
    mod = _triton_module("triton_distillation", hidden, weight)
    if mod is not None:
        dtype, vocab = _linear_dtype(hidden), weight.shape[0]
        dense_cfg = triton_configs.select_kd_dense(dtype, vocab)
        if dense_cfg is not None:
            dense_op = functools.partial(mod.kd_dense_chunk_, cfg=dense_cfg)
        if isinstance(teacher, tuple):
            sparse_cfg = triton_configs.select_kd_sparse(dtype, vocab, teacher[0].shape[-1])
            if sparse_cfg is not None:
                sparse_op = functools.partial(mod.kd_sparse_chunk_, cfg=sparse_cfg)
    return reference.linear_kl_div(
        hidden, weight, bias, teacher, temperature, mask, reduction, _options.chunk_rows, dense_op, sparse_op
    )
