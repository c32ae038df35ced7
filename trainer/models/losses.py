"""Training losses; the heavy ones go through the kernel dispatch (Triton on GPU, reference on CPU)."""

from __future__ import annotations

import torch

from kernels import dispatch


def mlm_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `hidden @ weight.T + bias` against labels, and the number of argmax hits.

    Chunked over rows, so the [masked tokens, vocab] logits never exist in full."""
    return dispatch.linear_cross_entropy(hidden, weight, bias, labels, reduction="sum", return_correct=True)
