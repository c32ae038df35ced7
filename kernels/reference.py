"""Plain PyTorch reference implementations of every fused op.

They define the semantics the Triton kernels must reproduce (the tests compare against them) and
they are what runs on CPU.  The linear + loss ops are chunked over rows here too, so the CPU path
already avoids materialising the ``[N, V]`` logits; the per-chunk math is a pluggable "chunk op"
so the Triton path can reuse the same driver with a Triton kernel doing the softmax part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
IGNORE_INDEX = -100

#: chunk_op(logits_chunk, row_scale_chunk, *target_chunks) -> (loss_rows fp32, correct bool | None).
#: It must overwrite ``logits_chunk`` with ``row_scale[i] * d loss_i / d logits[i]``.
ChunkOp = Callable[..., tuple[Tensor, Tensor | None]]


# --------------------------------------------------------------------------------------------
# LayerNorm, bias + GELU
# --------------------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-12) -> Tensor:
    """LayerNorm over the last dimension (BERT's eps default)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """Exact (erf) GELU of ``x + bias``: BERT's "gelu" activation after a bias-free matmul."""
    return F.gelu(x + bias)


# --------------------------------------------------------------------------------------------
# Distillation losses on full logits
# --------------------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduce_rows(rows: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Zero masked-out rows, then reduce; "mean" divides by the number of kept rows (at least 1)."""
    _check_reduction(reduction)
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = mask.sum() if mask is not None else torch.tensor(rows.numel(), device=rows.device)
    return rows.sum() / count.clamp(min=1).to(rows.dtype)


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp32 math for low-precision inputs; float64 kept (the tests use it as an exact oracle)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)


def _xlogy_rows(p: Tensor, values: Tensor) -> Tensor:
    """Row sums of ``p * values`` with 0 * anything = 0 (so -inf logits with p = 0 are harmless)."""
    return torch.where(p > 0, p * values, torch.zeros((), device=p.device)).sum(-1)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """-sum_v p_teacher_T(v) log q_student_T(v) per row; fp32 result."""
    log_q = _log_probs(student_logits, temperature)
    p = _log_probs(teacher_logits.detach(), temperature).exp()
    return reduce_rows(-_xlogy_rows(p, log_q), mask, reduction)


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """KL(teacher_T || student_T) summed over the vocab (caller multiplies by T^2); fp32 result."""
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits.detach(), temperature)
    return reduce_rows(_xlogy_rows(log_p.exp(), log_p - log_q), mask, reduction)


def sparse_teacher_log_probs(topk_logprobs: Tensor, temperature: float) -> Tensor:
    """Teacher log-probabilities at temperature T renormalised over the stored k entries."""
    return torch.log_softmax(_at_least_fp32(topk_logprobs.detach()) / temperature, dim=-1)


def sparse_kl_div(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """KL against a stored top-k teacher: sum_j p_j (log p_j - log q_student_T(ids_j))."""
    log_q = _log_probs(student_logits, temperature)
    log_p = sparse_teacher_log_probs(topk_logprobs, temperature)
    log_q_at = log_q.gather(-1, topk_ids.long())
    return reduce_rows(_xlogy_rows(log_p.exp(), log_p - log_q_at), mask, reduction)


# --------------------------------------------------------------------------------------------
# Chunk ops: in-place softmax-loss + gradient of one chunk of logits
# --------------------------------------------------------------------------------------------


def _as_fp32_workspace(logits: Tensor) -> Tensor:
    """fp32/fp64 logits are overwritten in place; lower precision gets one fp32 copy per chunk."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def cross_entropy_chunk_(
    logits: Tensor, row_scale: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Cross-entropy rows + hits (label attains the row max); leaves row_scale * (softmax - onehot) in ``logits``."""
    x = _as_fp32_workspace(logits)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    picked = x.gather(1, safe[:, None]).squeeze(1)
    top = x.amax(dim=-1)
    correct = (picked >= top) & valid  # the label attains the max: no separate argmax pass over the vocab
    x.sub_(top[:, None]).exp_()  # in place: no [rows, vocab] temporary
    total = x.sum(dim=-1)
    loss = torch.where(valid, top + total.log() - picked, torch.zeros_like(top))
    scale = row_scale * valid  # ignored labels get no gradient whatever their scale
    x.mul_((scale / total)[:, None])
    x.scatter_add_(1, safe[:, None], -scale.to(x.dtype)[:, None])
    if x is not logits:
        logits.copy_(x)
    return loss, correct


def kd_dense_chunk_(
    logits: Tensor, row_scale: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> tuple[Tensor, None]:
    """KL(teacher_T || student_T) rows; leaves row_scale * (q - p) / T in ``logits``."""
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    loss = _xlogy_rows(p, log_p - log_q)
    grad = log_q.exp_().sub_(p).mul_(row_scale[:, None] / temperature)
    logits.copy_(grad)
    return loss, None


def kd_sparse_chunk_(
    logits: Tensor, row_scale: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, temperature: float = 1.0
) -> tuple[Tensor, None]:
    """Top-k KL rows; leaves row_scale * (q - scatter(p)) / T in ``logits``."""
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
    log_p = sparse_teacher_log_probs(topk_logprobs.float(), temperature)
    p = log_p.exp()
    ids = topk_ids.long()
    loss = _xlogy_rows(p, log_p - log_q.gather(1, ids))
    grad = log_q.exp_().scatter_add_(1, ids, -p).mul_(row_scale[:, None] / temperature)
    logits.copy_(grad)
    return loss, None


# --------------------------------------------------------------------------------------------
# Chunked linear + loss (gradients computed in the forward pass)
# --------------------------------------------------------------------------------------------


def default_chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so one chunk of logits is about as large as the hidden states (>= 4M elements)."""
    budget = max(n_rows * hidden, 1 << 22)
    rows = budget // max(vocab, 1)
    if rows >= 32:
        rows -= rows % 32
    return int(max(1, min(n_rows, rows)))


class ChunkedLinearLoss(torch.autograd.Function):
    """sum_i row_scale_i * loss_i(hidden_i @ W.T + b) without keeping the [N, V] logits.

    The forward walks over row chunks: logits chunk -> chunk op (loss + d/dlogits in place) ->
    grad_hidden / grad_weight / grad_bias accumulated immediately.  Backward only scales them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        row_scale: Tensor,
        chunk_op: ChunkOp,
        chunk_rows: int,
        need_grads: tuple[bool, bool, bool],
        *targets: Tensor,
    ) -> tuple[Tensor, Tensor]:
        n_rows = hidden.shape[0]
        need_h, need_w, need_b = need_grads
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if need_b and bias is not None
            else None
        )
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        n_correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            h = hidden[start:stop]
            logits = F.linear(h, weight, bias)
            rows, correct = chunk_op(logits, row_scale[start:stop], *(t[start:stop] for t in targets))
            loss_rows[start:stop] = rows
            if correct is not None:
                n_correct += correct.sum()
            grad_logits = logits  # overwritten in place by the chunk op
            if grad_h is not None:
                torch.mm(grad_logits, weight, out=grad_h[start:stop])
            if grad_w is not None:
                if grad_logits.dtype == torch.float32:
                    grad_w.addmm_(grad_logits.t(), h)
                else:
                    grad_w += torch.mm(grad_logits.t(), h)
            if grad_b is not None:
                grad_b += grad_logits.sum(0, dtype=torch.float32)
            del logits, grad_logits
        kept = row_scale != 0  # masked rows may hold garbage (e.g. -inf padding): never let it leak
        loss = torch.where(kept, loss_rows * row_scale, torch.zeros((), device=row_scale.device)).sum()
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.n_targets = len(targets)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(n_correct)
        return loss, n_correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Tensor | None):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss.float()
        out_h = (grad_h * scale).to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        out_b = (grad_b * scale).to(ctx.bias_dtype) if grad_b is not None else None
        return (out_h, out_w, out_b, None, None, None, None) + (None,) * ctx.n_targets


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on for this device, otherwise the hidden states' dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def run_chunked_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    row_scale: Tensor,
    chunk_op: ChunkOp,
    targets: tuple[Tensor, ...],
    chunk_rows: int | None,
) -> tuple[Tensor, Tensor]:
    """Flatten, cast to the compute dtype (autograd casts the grads back), run the chunked Function."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    dtype = compute_dtype(hidden)
    hidden, weight = hidden.to(dtype).contiguous(), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return ChunkedLinearLoss.apply(hidden, weight, bias, row_scale, chunk_op, rows, need, *targets)


def row_scale_for(valid: Tensor, reduction: str) -> Tensor:
    """Per-row weight that turns sum_i scale_i * loss_i into the requested reduction (no host sync)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for linear losses, got {reduction!r}")
    scale = valid.float()
    if reduction == "mean":
        scale = scale / valid.sum().clamp(min=1).float()
    return scale


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    reduction: Literal["mean", "sum"] = "mean",
    ignore_index: int = IGNORE_INDEX,
    return_correct: bool = False,
    chunk_rows: int | None = None,
    chunk_op: ChunkOp | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without the full logits.

    Returns the loss, or ``(loss, n_correct)`` with the number of kept rows whose argmax is the label.
    """
    labels = labels.reshape(-1)
    scale = row_scale_for(labels != ignore_index, reduction)
    op = chunk_op or cross_entropy_chunk_

    def with_ignore(logits: Tensor, row_scale: Tensor, lab: Tensor) -> tuple[Tensor, Tensor | None]:
        return op(logits, row_scale, lab, ignore_index)

    loss, n_correct = run_chunked_linear_loss(hidden, weight, bias, scale, with_ignore, (labels,), chunk_rows)
    return (loss, n_correct) if return_correct else loss


Teacher = Tensor | tuple[Tensor, Tensor]


def linear_kl_div(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: Teacher,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_rows: int | None = None,
    dense_op: ChunkOp | None = None,
    sparse_op: ChunkOp | None = None,
) -> Tensor:
    """KL(teacher_T || softmax((hidden @ W.T + b) / T)) per row, reduced, without the full logits.

    ``teacher`` is either dense teacher logits ``[N, V]`` or ``(topk_ids, topk_logprobs)``.
    """
    n_rows = hidden.reshape(-1, hidden.shape[-1]).shape[0]
    valid = torch.ones(n_rows, dtype=torch.bool, device=hidden.device) if mask is None else mask.reshape(-1).bool()
    scale = row_scale_for(valid, reduction)
    if isinstance(teacher, tuple):
        ids, logprobs = teacher
        sparse = sparse_op or kd_sparse_chunk_
        targets: tuple[Tensor, ...] = (ids.reshape(n_rows, -1), logprobs.reshape(n_rows, -1).detach())

        def op(logits: Tensor, row_scale: Tensor, i: Tensor, lp: Tensor) -> tuple[Tensor, Tensor | None]:
            return sparse(logits, row_scale, i, lp, temperature)

    else:
        dense = dense_op or kd_dense_chunk_
        targets = (teacher.reshape(n_rows, -1).detach(),)

        def op(logits: Tensor, row_scale: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:  # type: ignore[misc]
            return dense(logits, row_scale, t, temperature)

    loss, _ = run_chunked_linear_loss(hidden, weight, bias, scale, op, targets, chunk_rows)
    return loss
