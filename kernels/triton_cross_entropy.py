"""Triton softmax cross-entropy + gradient for one chunk of logits (used by linear_cross_entropy).

One program per row: pass 1 streams the vocabulary in BLOCK_V blocks with an online max /
sum-exp (and the running argmax for accuracy), pass 2 overwrites the logits *in place* with
``row_scale * (softmax - onehot)``, so the chunk needs no second vocabulary-sized buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.reference import IGNORE_INDEX
from kernels.triton_configs import LaunchConfig

#: True when these kernels were created by the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def cross_entropy_fwd_grad_kernel(
    LOGITS, LABELS, ROW_SCALE, LOSS, CORRECT, stride_l, n_cols, ignore_index, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    scale = tl.where(valid, tl.load(ROW_SCALE + row), 0.0)
    safe_label = tl.where(valid, label, 0)
    # Read the label logit before pass 1: pass 1's block reductions synchronise all warps, so no
    # warp can start overwriting this row in pass 2 before every warp has read it.
    x_label = tl.load(base + safe_label).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        blk_max = tl.max(x, axis=0)
        blk_arg = tl.argmax(x, axis=0)
        better = blk_max > best
        best_idx = tl.where(better, start + blk_arg, best_idx)
        best = tl.where(better, blk_max, best)
        m_new = tl.maximum(m, blk_max)
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(LOSS + row, tl.where(valid, m + tl.log(z) - x_label, 0.0))
    inv_z = 1.0 / z  # exp(x - max) / z: avoids the rounding error of lse in the softmax
    tl.store(CORRECT + row, (valid & (best_idx == label)).to(tl.int32))
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - m) * inv_z
        g = tl.where((offs == safe_label) & valid, g - 1.0, g) * scale
        g = tl.where(scale != 0.0, g, 0.0)
        tl.store(base + offs, g.to(LOGITS.dtype.element_ty), mask=mask)


def aot_signature(kernel: str, dtype: str) -> dict[str, str]:
    """Argument types for ahead-of-time compilation (labels are passed as int64)."""
    return {
        "LOGITS": f"*{dtype}",
        "LABELS": "*i64",
        "ROW_SCALE": "*fp32",
        "LOSS": "*fp32",
        "CORRECT": "*i32",
        "stride_l": "i32",
        "n_cols": "i32",
        "ignore_index": "i32",
        "BLOCK_V": "constexpr",
    }


KERNELS = {"cross_entropy_fwd_grad_kernel": cross_entropy_fwd_grad_kernel}


def cross_entropy_chunk_(
    logits: Tensor,
    row_scale: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    cfg: LaunchConfig,
) -> tuple[Tensor, Tensor]:
    """Chunk op (see ``kernels.reference.ChunkOp``): loss rows, argmax hits, grad left in ``logits``."""
    n_rows, n_cols = logits.shape
    assert logits.stride(-1) == 1
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    correct = torch.empty(n_rows, dtype=torch.int32, device=logits.device)
    if n_rows:
        cross_entropy_fwd_grad_kernel[(n_rows,)](
            logits,
            labels.long().contiguous(),
            row_scale.float().contiguous(),
            loss,
            correct,
            logits.stride(0),
            n_cols,
            ignore_index,
            **cfg.constants,
            **cfg.launch_options,
        )
    return loss, correct.bool()
