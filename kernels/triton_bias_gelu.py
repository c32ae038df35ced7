"""Fused bias add + exact (erf) GELU in Triton, forward and backward.

Forward reads the bias-free matmul output once and writes GELU(x + b) once; backward recomputes
x + b from the saved input instead of keeping a separate pre-activation tensor.
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
def bias_gelu_fwd_kernel(X, B, Y, n_elements, n_cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs % n_cols, mask=mask, other=0.0)
    z = x + b
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bias_gelu_bwd_kernel(X, B, DY, DX, n_elements, n_cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs % n_cols, mask=mask, other=0.0)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    z = x + b
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    tl.store(DX + offs, (dy * (cdf + z * pdf)).to(DX.dtype.element_ty), mask=mask)


def aot_signature(kernel: str, dtype: str) -> dict[str, str]:
    """Argument types for ahead-of-time compilation (bias is always passed as fp32)."""
    act = f"*{dtype}"
    if kernel == "bias_gelu_fwd_kernel":
        return {"X": act, "B": "*fp32", "Y": act, "n_elements": "i32", "n_cols": "i32", "BLOCK": "constexpr"}
    return {
        "X": act,
        "B": "*fp32",
        "DY": act,
        "DX": act,
        "n_elements": "i32",
        "n_cols": "i32",
        "BLOCK": "constexpr",
    }


KERNELS = {"bias_gelu_fwd_kernel": bias_gelu_fwd_kernel, "bias_gelu_bwd_kernel": bias_gelu_bwd_kernel}


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, bias: Tensor, fwd: LaunchConfig, bwd: LaunchConfig
    ) -> Tensor:
        x = x.contiguous()
        b32 = bias.detach().float().contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        if n:
            grid = (triton.cdiv(n, fwd.constants["BLOCK"]),)
            bias_gelu_fwd_kernel[grid](x, b32, y, n, b32.numel(), **fwd.constants, **fwd.launch_options)
        ctx.save_for_backward(x, b32)
        ctx.bwd = bwd
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, b32 = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n = x.numel()
        if n:
            grid = (triton.cdiv(n, ctx.bwd.constants["BLOCK"]),)
            bias_gelu_bwd_kernel[grid](x, b32, dy, dx, n, b32.numel(), **ctx.bwd.constants, **ctx.bwd.launch_options)
        dbias = dx.reshape(-1, b32.numel()).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dbias, None, None


def bias_gelu(x: Tensor, bias: Tensor, fwd: LaunchConfig, bwd: LaunchConfig) -> Tensor:
    """GELU(x + bias) (bias over the last dim) with the given (dispatch-chosen) launch configs."""
    return BiasGeluFunction.apply(x, bias, fwd, bwd)
