"""Analysis of stored soft labels: what keeping only the teacher's top-k costs."""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def topk_kl_to_full(full_logprobs: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> float:
    """Mean over positions of KL(q || p): p the teacher's full distribution, q its stored top-k renormalised.

    This is what keeping only k costs. The other direction, KL(p || q), is infinite whenever p puts
    any mass outside the top-k (q is 0 there), so it cannot measure anything. With exact top-k
    values KL(q || p) = -log(sum of the top-k probabilities); fp16 rounding of the stored values
    adds its own (small) share. Inputs: [..., V], [..., k], [..., k]; `full_logprobs` may be logits.
    """
    full = _log_softmax(np.asarray(full_logprobs, dtype=np.float64))
    ids = np.asarray(topk_ids, dtype=np.int64)
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if ids.shape != lp.shape or ids.shape[:-1] != full.shape[:-1]:
        raise ValueError(f"shapes disagree: full {full.shape}, top-k ids {ids.shape}, top-k log-probs {lp.shape}")
    log_q = _log_softmax(lp)
    log_p = np.take_along_axis(full, ids, axis=-1)
    kl = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
    return float(np.mean(kl)) if kl.size else 0.0
