"""Fused kernels for wellread: Triton on GPU, plain PyTorch elsewhere (see ``kernels.dispatch``).

Importing this package is deliberately cheap and imports neither torch nor triton: the public API
is resolved lazily on first attribute access, e.g. ``kernels.linear_cross_entropy`` or
``from kernels.dispatch import linear_cross_entropy``.  No ``__version__`` is defined on purpose:
transformers probes a top-level ``kernels`` package (Hugging Face's hub kernels) and must never
mistake this one for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "configure": "kernels.dispatch",
    "layer_norm": "kernels.dispatch",
    "bias_gelu": "kernels.dispatch",
    "soft_cross_entropy": "kernels.dispatch",
    "kl_div": "kernels.dispatch",
    "sparse_kl_div": "kernels.dispatch",
    "linear_cross_entropy": "kernels.dispatch",
    "linear_kl_div": "kernels.dispatch",
    "backend_for": "kernels.dispatch",
    "fuse_bert": "kernels.patch",
    "fused_mlm_loss": "kernels.patch",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
