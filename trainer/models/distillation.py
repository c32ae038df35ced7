"""Distillation loss terms (KD on logits, DistilBERT's cosine, Patient KD) and the teacher-layer maps.

Convention: every term returns a SUM over its rows (examples, or token positions), never a mean. The
training loop divides the weighted sum of terms by the global row count, so any number of ranks or
accumulation steps gives the same gradient. The teacher side of every term is a fixed target (detached).

Translating a paper's weights to ours. A paper's term is ``w_paper * S / D_paper`` where ``S`` is what our
function returns and ``D_paper`` is what the paper's code averages over; ours is ``w_ours * S / D_ours``
with ``D_ours`` the loop's count (examples for a classifier, token rows for MLM). Hence

    w_ours = w_paper * D_ours / D_paper,        temperature T unchanged (both multiply KL by T^2).

* DistilBERT: ``KLDivLoss(reduction="batchmean") * T^2`` over the kept token rows and
  ``CosineEmbeddingLoss(reduction="mean")`` over non-pad positions: ``D_paper`` = rows, so when the loop
  divides by the same rows, ``alpha_ce`` and ``alpha_cos`` carry over unchanged (rescale by
  rows_ours / rows_paper when the loop divides, say, by masked tokens instead of non-pad tokens).
* Patient KD (Sun et al. 2019), whose code averages over everything: the KD term is
  ``KLDivLoss(reduction="mean") * T^2``, a mean over B examples *and C classes*, so
  ``alpha_ours = alpha_paper / C`` (the CE term, a mean over examples, keeps ``1 - alpha``); the patience
  term is ``F.mse_loss`` (mean over B examples x M mapped layers x H hidden dims) of the normalised [CLS]
  vectors, so ``beta_ours = beta_paper / (M * H)``. That averaging is why the paper's beta is in the
  hundreds: SST-2's beta = 100 with M = 5, H = 768 is beta_ours = 100 / 3840 = 0.026. (The paper's
  *formula*, a sum over layers of squared L2 distances, is ours per example: with it, beta is the same.)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import dispatch
from kernels.reference import Teacher

__all__ = [
    "HiddenProjection",
    "cosine_loss_sum",
    "distilbert_layers",
    "kd_loss_sum",
    "linear_kd_loss_sum",
    "pkd_layer_map",
    "pkd_loss_sum",
    "sparse_kd_loss_sum",
]


def _flat_mask(mask: Tensor | None, rows_shape: torch.Size, what: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.numel() != math.prod(rows_shape):
        raise ValueError(f"{what}: mask has {mask.numel()} entries for {math.prod(rows_shape)} rows")
    return mask.reshape(rows_shape).bool()


# -------------------------------------------------------------------------- logit terms --------


def kd_loss_sum(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """sum over kept rows of T^2 * KL(softmax(teacher/T) || softmax(student/T)) (Hinton et al.).

    The T^2 factor keeps the gradient's size independent of T: d/ds = T * (softmax(s/T) - softmax(t/T))
    per row, and softmax differences shrink like 1/T. Logits ``[..., C]``; ``mask`` ``[...]`` keeps rows.
    Runs through ``kernels.dispatch.kl_div`` (Triton on CUDA, the PyTorch reference elsewhere); fp32 result
    (float64 inputs stay float64).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss_sum: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    mask = _flat_mask(mask, student_logits.shape[:-1], "kd_loss_sum")
    kl = dispatch.kl_div(student_logits, teacher_logits, temperature, reduction="sum", mask=mask)
    return kl * (temperature * temperature)


def sparse_kd_loss_sum(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """:func:`kd_loss_sum` against a stored top-k teacher (``wellread label`` soft labels).

    The teacher distribution at temperature T is ``softmax(topk_logprobs / T)`` over the k stored entries:
    the teacher's missing mass (the V - k tokens not stored) is dropped and the k entries renormalised,
    exactly as ``kernels.dispatch.sparse_kl_div`` does. So the term is a KL to the teacher *conditioned on
    its top k*; with k = V it equals :func:`kd_loss_sum` on the full teacher logits (log-probs differ from
    logits by a per-row constant, which the softmax removes). The student side is its full softmax over V.
    """
    if topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"sparse_kd_loss_sum: topk_ids {tuple(topk_ids.shape)} and topk_logprobs "
            f"{tuple(topk_logprobs.shape)} differ in shape"
        )
    if topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"sparse_kd_loss_sum: {tuple(topk_ids.shape[:-1])} top-k rows for "
            f"{tuple(student_logits.shape[:-1])} student rows"
        )
    mask = _flat_mask(mask, student_logits.shape[:-1], "sparse_kd_loss_sum")
    kl = dispatch.sparse_kl_div(student_logits, topk_ids, topk_logprobs, temperature, reduction="sum", mask=mask)
    return kl * (temperature * temperature)


def linear_kd_loss_sum(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: Teacher,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """:func:`kd_loss_sum` (or the sparse one) of student logits ``hidden @ weight.T + bias``, never materialised.

    For MLM distillation over a 30k vocabulary: ``kernels.dispatch.linear_kl_div`` walks row chunks and
    computes the gradient in the forward pass. ``teacher``: dense logits ``[N, V]`` or ``(topk_ids,
    topk_logprobs)``. Math in fp32 whatever the input dtype.
    """
    kl = dispatch.linear_kl_div(hidden, weight, bias, teacher, temperature, mask=mask, reduction="sum")
    return kl * (temperature * temperature)


# ------------------------------------------------------------------------- hidden terms --------


class HiddenProjection(nn.Linear):
    """Learned map from the student's hidden width to the teacher's, for the cosine / PKD terms when they differ.

    Apply it to the student's states before :func:`cosine_loss_sum` or :func:`pkd_loss_sum`; it is trained
    with the student (its parameters belong in the optimizer) and dropped at export.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, bias: bool = True):
        super().__init__(student_hidden, teacher_hidden, bias=bias)


def _check_width(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{what}: student hidden size {student.shape[-1]} != teacher hidden size {teacher.shape[-1]}; "
            f"project the student's states first (HiddenProjection({student.shape[-1]}, {teacher.shape[-1]}))"
        )


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cosine_loss_sum(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> Tensor:
    """sum over kept positions of 1 - cos(student, teacher): DistilBERT's ``CosineEmbeddingLoss`` (target 1)
    on the last hidden states, as a sum. ``[B, T, H]`` states, ``mask`` ``[B, T]`` (1 = non-pad).

    Computed over all positions then zeroed where masked (no boolean indexing, so no host sync on GPU);
    cosine uses torch's eps on the norms, so an all-zero pad vector gives cos = 0, never NaN.
    """
    _check_width(student_hidden, teacher_hidden, "cosine_loss_sum")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"cosine_loss_sum: student states {tuple(student_hidden.shape)} and teacher states "
            f"{tuple(teacher_hidden.shape)} differ in shape"
        )
    keep = _flat_mask(mask, student_hidden.shape[:-1], "cosine_loss_sum")
    cos = F.cosine_similarity(_at_least_fp32(student_hidden), _at_least_fp32(teacher_hidden.detach()), dim=-1)
    rows = 1.0 - cos
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum()


def pkd_loss_sum(student_cls: list[Tensor], teacher_cls: list[Tensor]) -> Tensor:
    """Patient KD: sum over examples and mapped layers of || s/|s| - t/|t| ||^2 on the [CLS] vectors.

    ``student_cls[m]`` / ``teacher_cls[m]``: ``[B, H]`` [CLS] states of the m-th pair of
    :func:`pkd_layer_map` (``hidden_states[i][:, 0]``). Widths must match (project the student first).
    Equals 2 - 2 cos per vector pair. See the module docstring for the paper's beta.
    """
    if len(student_cls) != len(teacher_cls):
        raise ValueError(f"pkd_loss_sum: {len(student_cls)} student layers vs {len(teacher_cls)} teacher layers")
    if not student_cls:
        raise ValueError("pkd_loss_sum: no mapped layers (a 1-layer student has none; drop the PKD term)")
    total = None
    for m, (s, t) in enumerate(zip(student_cls, teacher_cls, strict=True)):
        _check_width(s, t, f"pkd_loss_sum (mapped layer {m})")
        if s.shape != t.shape:
            raise ValueError(f"pkd_loss_sum (mapped layer {m}): student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        diff = F.normalize(_at_least_fp32(s), dim=-1) - F.normalize(_at_least_fp32(t.detach()), dim=-1)
        term = diff.square().sum()
        total = term if total is None else total + term
    assert total is not None
    return total


# --------------------------------------------------------------------------- layer maps --------


def _check_layers(teacher_layers: int, student_layers: int) -> None:
    if student_layers < 1 or student_layers > teacher_layers:
        raise ValueError(f"student layers must be in 1..{teacher_layers} (the teacher's depth), got {student_layers}")


def pkd_layer_map(teacher_layers: int, student_layers: int, scheme: Literal["skip", "last"]) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based as in the PKD paper, for student layers 1 .. L_s - 1.

    The last student layer is left out: the KD term on the logits covers it. ``skip``: teacher layer
    k * (L_t // L_s) (12 -> 6: 2, 4, 6, 8, 10); ``last``: the L_s - 1 teacher layers just below the top one
    (12 -> 6: 7, 8, 9, 10, 11). With Hugging Face ``output_hidden_states=True`` a model returns L + 1 tensors,
    index 0 the embeddings, so 1-based layer i is ``hidden_states[i]`` for student and teacher alike.
    """
    _check_layers(teacher_layers, student_layers)
    if scheme == "skip":
        step = teacher_layers // student_layers
        return [(k, k * step) for k in range(1, student_layers)]
    if scheme == "last":
        first = teacher_layers - student_layers + 1
        return [(k, first + k - 1) for k in range(1, student_layers)]
    raise ValueError(f"PKD scheme must be 'skip' or 'last', got {scheme!r}")


def distilbert_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """0-based teacher layers to copy into a shallower student ("every other layer").

    Evenly spread, first and last included: round(i * (L_t - 1) / (L_s - 1)) for i = 0 .. L_s - 1, halves
    rounded up. For 12 -> 6 this is 0, 2, 4, 7, 9, 11, exactly what DistilBERT's extraction script copies
    (hand-written: that script is not a library and hard-codes 12 -> 6). A 1-layer student gets layer 0,
    whose input (the embeddings) it keeps.
    """
    _check_layers(teacher_layers, student_layers)
    if student_layers == 1:
        return [0]
    span, gaps = teacher_layers - 1, student_layers - 1
    return [(2 * i * span + gaps) // (2 * gaps) for i in range(student_layers)]  # floor(x + 1/2) in integers
