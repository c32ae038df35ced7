"""Fused LayerNorm forward + backward in Triton (one row per program, row kept in registers).

Forward saves only per-row mean and 1/std (fp32, [N] each) next to the input; backward computes
dx in one pass per row and per-program partial sums of dweight/dbias (summed by torch), which keeps
the reduction deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_configs import LaunchConfig

#: True when these kernels were created by the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    b = tl.load(B + cols, mask=mask, other=0.0)
    y = xc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(
    X,
    W,
    MEAN,
    RSTD,
    DY,
    DX,
    DW_PART,
    DB_PART,
    stride_x,
    stride_dy,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        row_ok = row < n_rows
        # row_ok broadcast as a block: "block & scalar" trips Triton's interpreter
        mask = col_mask & ((cols + row) < (n_rows + cols))
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        c2 = tl.sum(wdy, axis=0) / n_cols
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_mask)
    tl.store(DB_PART + pid * n_cols + cols, db, mask=col_mask)


def aot_signature(kernel: str, dtype: str) -> dict[str, str]:
    """Argument types for ahead-of-time compilation (weights are always passed as fp32)."""
    act = f"*{dtype}"
    if kernel == "layer_norm_fwd_kernel":
        return {
            "X": act,
            "W": "*fp32",
            "B": "*fp32",
            "Y": act,
            "MEAN": "*fp32",
            "RSTD": "*fp32",
            "stride_x": "i32",
            "stride_y": "i32",
            "n_cols": "i32",
            "eps": "fp32",
            "BLOCK_N": "constexpr",
        }
    return {
        "X": act,
        "W": "*fp32",
        "MEAN": "*fp32",
        "RSTD": "*fp32",
        "DY": act,
        "DX": act,
        "DW_PART": "*fp32",
        "DB_PART": "*fp32",
        "stride_x": "i32",
        "stride_dy": "i32",
        "stride_dx": "i32",
        "n_rows": "i32",
        "n_cols": "i32",
        "rows_per_program": "i32",
        "BLOCK_N": "constexpr",
    }


KERNELS = {"layer_norm_fwd_kernel": layer_norm_fwd_kernel, "layer_norm_bwd_kernel": layer_norm_bwd_kernel}


def _rows(t: Tensor, n_cols: int) -> Tensor:
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _backward_programs(device: torch.device, n_rows: int) -> int:
    """Enough programs to fill the GPU; few on the interpreter, where programs run one by one."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(n_rows, target))


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, fwd: LaunchConfig, bwd: LaunchConfig
    ) -> Tensor:
        n_cols = x.shape[-1]
        x2 = _rows(x, n_cols)
        n_rows = x2.shape[0]
        w32 = weight.detach().float().contiguous()
        b32 = bias.detach().float().contiguous()
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            layer_norm_fwd_kernel[(n_rows,)](
                x2,
                w32,
                b32,
                y,
                mean,
                rstd,
                x2.stride(0),
                y.stride(0),
                n_cols,
                eps,
                **fwd.constants,
                **fwd.launch_options,
            )
        ctx.save_for_backward(x2, w32, mean, rstd)
        ctx.bwd = bwd
        ctx.shape = x.shape
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x2, w32, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows(dy, n_cols)
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        programs = _backward_programs(x2.device, n_rows)
        rows_per_program = triton.cdiv(n_rows, programs)
        dw_part = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
        db_part = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows:
            layer_norm_bwd_kernel[(programs,)](
                x2,
                w32,
                mean,
                rstd,
                dy2,
                dx,
                dw_part,
                db_part,
                x2.stride(0),
                dy2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                rows_per_program,
                **ctx.bwd.constants,
                **ctx.bwd.launch_options,
            )
        w_dtype, b_dtype = ctx.param_dtypes
        return dx.view(ctx.shape), dw_part.sum(0).to(w_dtype), db_part.sum(0).to(b_dtype), None, None, None


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, fwd: LaunchConfig, bwd: LaunchConfig) -> Tensor:
    """LayerNorm over the last dim with the given (dispatch-chosen) launch configs."""
    return LayerNormFunction.apply(x, weight, bias, eps, fwd, bwd)
