"""Triton temperature-scaled distillation losses with the student gradient computed in the forward.

Dense teacher: one program per row streams student and teacher logits in BLOCK_V blocks with an
online log-sum-exp for both (pass 1, giving KL and soft cross-entropy of the row), then writes
``row_scale * (q_T - p_T) / T`` (pass 2).  Sparse teacher: the row's k stored log-probs are
renormalised at temperature T in registers; the kernel writes ``row_scale * q_T / T`` and the k
teacher terms are subtracted with one [N, k] scatter-add.  Only that gradient ([N, V], student
dtype) is saved for backward, which merely multiplies it by the incoming gradient; the softmaxes
are never stored.  Teacher inputs are constants: no gradient flows to them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.reference import reduce_rows
from kernels.triton_configs import LaunchConfig

#: True when these kernels were created by the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def kd_dense_fwd_grad_kernel(
    S,
    T,
    G,
    ROW_SCALE,
    LOSS_KL,
    LOSS_CE,
    stride_s,
    stride_t,
    stride_g,
    n_cols,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_base = S + row * stride_s
    t_base = T + row * stride_t
    g_base = G + row * stride_g
    scale = tl.load(ROW_SCALE + row)
    cols = tl.arange(0, BLOCK_V)
    m_s = tl.full((), float("-inf"), tl.float32)
    z_s = tl.zeros((), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_t = tl.zeros((), tl.float32)
    a_t = tl.zeros((), tl.float32)  # sum e_t * (t - s): KL numerator
    b_t = tl.zeros((), tl.float32)  # sum e_t * s: soft cross-entropy numerator
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        s_raw = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        t_raw = tl.load(t_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        s = tl.where(mask, s_raw, float("-inf"))
        t = tl.where(mask, t_raw, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(s, axis=0))
        z_s = z_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s - ms_new), axis=0)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(t, axis=0))
        alpha = tl.exp(m_t - mt_new)
        e_t = tl.exp(t - mt_new)
        z_t = z_t * alpha + tl.sum(e_t, axis=0)
        # where() before the product: 0 * (-inf) would be NaN for teacher entries at -inf
        a_t = a_t * alpha + tl.sum(e_t * tl.where(e_t > 0.0, t_raw - s_raw, 0.0), axis=0)
        b_t = b_t * alpha + tl.sum(e_t * tl.where(e_t > 0.0, s_raw, 0.0), axis=0)
        m_t = mt_new
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    tl.store(LOSS_KL + row, a_t / z_t - lse_t + lse_s)
    tl.store(LOSS_CE + row, lse_s - b_t / z_t)
    # exp(x - max) / z rather than exp(x - lse): no rounding error of lse (~ulp(log V)) in q and p.
    inv_zs = 1.0 / z_s
    inv_zt = 1.0 / z_t
    g_scale = scale * inv_temp
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        s = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        t = tl.load(t_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        g = (tl.exp(s - m_s) * inv_zs - tl.exp(t - m_t) * inv_zt) * g_scale
        g = tl.where(scale != 0.0, g, 0.0)
        tl.store(g_base + offs, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def kd_sparse_fwd_grad_kernel(
    S,
    IDS,
    LP,
    G,
    P_OUT,
    ROW_SCALE,
    LOSS,
    stride_s,
    stride_ids,
    stride_lp,
    stride_g,
    n_cols,
    k,
    inv_temp,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_base = S + row * stride_s
    g_base = G + row * stride_g
    scale = tl.load(ROW_SCALE + row)
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < k
    lp = tl.load(LP + row * stride_lp + kk, mask=kmask, other=float("-inf")).to(tl.float32) * inv_temp
    m_p = tl.max(lp, axis=0)
    e = tl.exp(lp - m_p)
    z_p = tl.sum(e, axis=0)
    p = e / z_p
    logp = lp - m_p - tl.log(z_p)
    ids = tl.load(IDS + row * stride_ids + kk, mask=kmask, other=0)
    # Gather before pass 1 (whose reductions synchronise the warps) so no warp can read a
    # position another warp already overwrote in pass 2 when G aliases S.
    s_at = tl.load(s_base + ids, mask=kmask, other=0.0).to(tl.float32) * inv_temp
    cross = tl.sum(p * tl.where(p > 0.0, logp - s_at, 0.0), axis=0)
    cols = tl.arange(0, BLOCK_V)
    m_s = tl.full((), float("-inf"), tl.float32)
    z_s = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        s = tl.load(s_base + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32) * inv_temp
        ms_new = tl.maximum(m_s, tl.max(s, axis=0))
        z_s = z_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s - ms_new), axis=0)
        m_s = ms_new
    tl.store(LOSS + row, cross + m_s + tl.log(z_s))
    g_scale = scale * inv_temp / z_s
    keep = scale != 0.0
    tl.store(P_OUT + row * k + kk, tl.where(keep, p * (scale * inv_temp), 0.0), mask=kmask)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        s = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        g = tl.where(keep, tl.exp(s - m_s) * g_scale, 0.0)
        tl.store(g_base + offs, g.to(G.dtype.element_ty), mask=mask)


def aot_signature(kernel: str, dtype: str) -> dict[str, str]:
    """Argument types for ahead-of-time compilation (teacher top-k passed as int64 / fp32)."""
    act = f"*{dtype}"
    if kernel == "kd_dense_fwd_grad_kernel":
        return {
            "S": act,
            "T": act,
            "G": act,
            "ROW_SCALE": "*fp32",
            "LOSS_KL": "*fp32",
            "LOSS_CE": "*fp32",
            "stride_s": "i32",
            "stride_t": "i32",
            "stride_g": "i32",
            "n_cols": "i32",
            "inv_temp": "fp32",
            "BLOCK_V": "constexpr",
        }
    return {
        "S": act,
        "IDS": "*i64",
        "LP": "*fp32",
        "G": act,
        "P_OUT": "*fp32",
        "ROW_SCALE": "*fp32",
        "LOSS": "*fp32",
        "stride_s": "i32",
        "stride_ids": "i32",
        "stride_lp": "i32",
        "stride_g": "i32",
        "n_cols": "i32",
        "k": "i32",
        "inv_temp": "fp32",
        "BLOCK_V": "constexpr",
        "BLOCK_K": "constexpr",
    }


KERNELS = {
    "kd_dense_fwd_grad_kernel": kd_dense_fwd_grad_kernel,
    "kd_sparse_fwd_grad_kernel": kd_sparse_fwd_grad_kernel,
}


def _rows(t: Tensor, n_cols: int) -> Tensor:
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _kept_rows(mask: Tensor | None, n_rows: int, device: torch.device) -> Tensor:
    return torch.ones(n_rows, dtype=torch.bool, device=device) if mask is None else mask.reshape(-1)


def row_scale(valid: Tensor, reduction: str) -> Tensor:
    """Per-row factor baked into the saved gradient: 1/n_kept for "mean", 1 (kept) / 0 otherwise."""
    scale = valid.float()
    if reduction == "mean":
        scale = scale / valid.sum().clamp(min=1).float()
    return scale


# ---------------------------------------------------------------- chunk ops (in place) --------


def kd_dense_chunk_(
    logits: Tensor, scale: Tensor, teacher: Tensor, temperature: float = 1.0, *, cfg: LaunchConfig
) -> tuple[Tensor, None]:
    """Chunk op (see ``kernels.reference.ChunkOp``): KL rows, gradient left in ``logits``."""
    n_rows, n_cols = logits.shape
    teacher = _rows(teacher.to(logits.dtype), n_cols)
    loss_kl = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    loss_ce = torch.empty_like(loss_kl)
    if n_rows:
        kd_dense_fwd_grad_kernel[(n_rows,)](
            logits,
            teacher,
            logits,
            scale.float().contiguous(),
            loss_kl,
            loss_ce,
            logits.stride(0),
            teacher.stride(0),
            logits.stride(0),
            n_cols,
            1.0 / temperature,
            **cfg.constants,
            **cfg.launch_options,
        )
    return loss_kl, None


def kd_sparse_chunk_(
    logits: Tensor,
    scale: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    *,
    cfg: LaunchConfig,
) -> tuple[Tensor, None]:
    """Chunk op for a top-k teacher: KL rows, gradient left in ``logits``."""
    loss, _ = _sparse_into(logits, logits, topk_ids, topk_logprobs, scale, temperature, cfg)
    return loss, None


def _sparse_into(
    student: Tensor,
    grad: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    scale: Tensor,
    temperature: float,
    cfg: LaunchConfig,
) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = student.shape
    ids = topk_ids.reshape(n_rows, -1).long().contiguous()
    logprobs = topk_logprobs.reshape(n_rows, -1).float().contiguous()
    k = ids.shape[1]
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    p_scaled = torch.empty((n_rows, k), dtype=torch.float32, device=student.device)
    if n_rows:
        kd_sparse_fwd_grad_kernel[(n_rows,)](
            student,
            ids,
            logprobs,
            grad,
            p_scaled,
            scale.float().contiguous(),
            loss,
            student.stride(0),
            ids.stride(0),
            logprobs.stride(0),
            grad.stride(0),
            n_cols,
            k,
            1.0 / temperature,
            **cfg.constants,
            **cfg.launch_options,
        )
    grad.scatter_add_(1, ids, p_scaled.neg().to(grad.dtype))
    return loss, grad


# ---------------------------------------------------------------- autograd Functions --------


class DenseDistillFunction(torch.autograd.Function):
    """KL or soft cross-entropy against dense teacher logits; saves only d loss / d student."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        teacher: Tensor,
        temperature: float,
        reduction: str,
        mask: Tensor | None,
        kind: str,
        cfg: LaunchConfig,
    ) -> Tensor:
        n_cols = student.shape[-1]
        s2 = _rows(student, n_cols)
        t2 = _rows(teacher.detach().to(student.dtype), n_cols)
        n_rows = s2.shape[0]
        valid = _kept_rows(mask, n_rows, s2.device)
        scale = row_scale(valid, reduction)
        grad = torch.empty((n_rows, n_cols), dtype=student.dtype, device=student.device)
        loss_kl = torch.empty(n_rows, dtype=torch.float32, device=student.device)
        loss_ce = torch.empty_like(loss_kl)
        if n_rows:
            kd_dense_fwd_grad_kernel[(n_rows,)](
                s2,
                t2,
                grad,
                scale,
                loss_kl,
                loss_ce,
                s2.stride(0),
                t2.stride(0),
                grad.stride(0),
                n_cols,
                1.0 / temperature,
                **cfg.constants,
                **cfg.launch_options,
            )
        rows = loss_kl if kind == "kl" else loss_ce
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.shape = student.shape
        return reduce_rows(rows.view(student.shape[:-1]), mask, reduction)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        factor = grad_out.reshape(-1, 1) if ctx.reduction == "none" else grad_out
        return (grad * factor).to(grad.dtype).view(ctx.shape), None, None, None, None, None, None


class SparseDistillFunction(torch.autograd.Function):
    """KL against a stored top-k teacher; saves only d loss / d student."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        temperature: float,
        reduction: str,
        mask: Tensor | None,
        cfg: LaunchConfig,
    ) -> Tensor:
        n_cols = student.shape[-1]
        s2 = _rows(student, n_cols)
        n_rows = s2.shape[0]
        valid = _kept_rows(mask, n_rows, s2.device)
        grad = torch.empty((n_rows, n_cols), dtype=student.dtype, device=student.device)
        rows, grad = _sparse_into(
            s2, grad, topk_ids, topk_logprobs.detach(), row_scale(valid, reduction), temperature, cfg
        )
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.shape = student.shape
        return reduce_rows(rows.view(student.shape[:-1]), mask, reduction)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        factor = grad_out.reshape(-1, 1) if ctx.reduction == "none" else grad_out
        return (grad * factor).to(grad.dtype).view(ctx.shape), None, None, None, None, None, None


def distill_dense(
    student: Tensor,
    teacher: Tensor,
    temperature: float,
    reduction: str,
    mask: Tensor | None,
    kind: str,
    cfg: LaunchConfig,
) -> Tensor:
    """``kind`` "kl" (KL(teacher_T || student_T)) or "ce" (soft cross-entropy); fp32 loss."""
    return DenseDistillFunction.apply(student, teacher, temperature, reduction, mask, kind, cfg)


def distill_sparse(
    student: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float,
    reduction: str,
    mask: Tensor | None,
    cfg: LaunchConfig,
) -> Tensor:
    """KL(top-k teacher_T || student_T); fp32 loss."""
    return SparseDistillFunction.apply(student, topk_ids, topk_logprobs, temperature, reduction, mask, cfg)
