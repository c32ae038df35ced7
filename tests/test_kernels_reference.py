"""The PyTorch reference path (what runs on CPU) and the dispatch rules, against naive compositions.

Tolerances: fp32 rtol 1e-5 / atol 1e-6 (1e-7 for gradients, which are ~1/N); bf16 rtol/atol 2e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import dispatch, reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch.configure()
    yield
    dispatch.configure()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _close(a: torch.Tensor, e: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.detach().double(), e.detach().double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- package -------


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_package_import_is_light_and_has_no_version():
    proc = _python(
        "import sys, kernels\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'heavy import'\n"
        "assert not hasattr(kernels, '__version__')\n"
        "assert callable(kernels.linear_cross_entropy) and 'torch' in sys.modules\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_transformers_does_not_mistake_us_for_hub_kernels():
    proc = _python(
        "import kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    x = torch.randn(3, 4)
    assert dispatch.backend_for(x) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.backend_for(x) == ("triton" if dispatch.triton_importable() else "reference")
    dispatch.configure(use_triton=False)
    assert dispatch.backend_for(x) == "reference"


def test_configure_validates():
    with pytest.raises(ValueError):
        dispatch.configure(chunk_rows=0)
    dispatch.configure(use_triton=False, compile_reference=False, chunk_rows=7)
    assert dispatch.options() == dispatch.Options(False, False, 7)


def test_configs_table_is_what_dispatch_selects():
    from kernels import triton_configs as tc

    table = set(tc.all_configs())
    assert len(table) == len(tc.TABLE) == 72
    for dtype in tc.DTYPES:
        for width in (1, 64, 128, 129, 768, 1024, 3000, 4096):
            assert set(tc.select_layer_norm(dtype, width)) <= table
        assert tc.select_layer_norm(dtype, 4097) is None
        assert set(tc.select_bias_gelu(dtype)) <= table
        for vocab in (2, 1000, 1024, 1025, 30522, 250_000):
            assert tc.select_cross_entropy(dtype, vocab) in table
            assert tc.select_kd_dense(dtype, vocab) in table
            for k in (1, 16, 17, 64, 100, 256):
                assert tc.select_kd_sparse(dtype, vocab, k) in table
            assert tc.select_kd_sparse(dtype, vocab, 257) is None
    assert tc.select_layer_norm("fp64", 64) is None


# ----------------------------------------------------------------------------- LN, GELU ------


def test_layer_norm_and_bias_gelu_reference():
    x, w, b = torch.randn(5, 7, 32), torch.randn(32), torch.randn(32)
    _close(dispatch.layer_norm(x, w, b, 1e-12), torch.nn.functional.layer_norm(x, (32,), w, b, 1e-12))
    _close(dispatch.bias_gelu(x, b), torch.nn.GELU()(x + b))


# ----------------------------------------------------------------------------- distillation ---


def _logits(n=6, v=50, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_div_matches_torch_kl_div(temperature):
    s, t = _logits()
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    _close(dispatch.kl_div(s, t, temperature), expected)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    _close(dispatch.soft_cross_entropy(s, t, temperature), expected + entropy)


def test_distillation_mask_and_reductions():
    s, t = _logits(n=5)
    mask = torch.tensor([True, False, True, True, False])
    rows = reference.kl_div(s, t, 2.0, "none")
    _close(dispatch.kl_div(s, t, 2.0, "none", mask), torch.where(mask, rows, 0))
    _close(dispatch.kl_div(s, t, 2.0, "sum", mask), rows[mask].sum())
    _close(dispatch.kl_div(s, t, 2.0, "mean", mask), rows[mask].mean())
    _close(dispatch.kl_div(s, t, 2.0, "mean", torch.zeros(5, dtype=torch.bool)), torch.tensor(0.0))
    with pytest.raises(ValueError):
        dispatch.kl_div(s, t, reduction="batchmean")


def test_sparse_kl_with_all_ids_equals_dense():
    s, t = _logits(v=40)
    k_ids = torch.argsort(t, dim=-1, descending=True)
    k_lp = torch.log_softmax(t, -1).gather(1, k_ids)
    _close(dispatch.sparse_kl_div(s, k_ids, k_lp, 2.0), dispatch.kl_div(s, t, 2.0))
    top = 5  # truncation renormalises over the kept entries
    p_top = torch.softmax(k_lp[:, :top] / 2.0, -1)
    log_q = torch.log_softmax(s / 2.0, -1).gather(1, k_ids[:, :top])
    expected = (p_top * (p_top.log() - log_q)).sum(-1).mean()
    _close(dispatch.sparse_kl_div(s, k_ids[:, :top].int(), k_lp[:, :top].half().float(), 2.0), expected)


def test_teacher_gets_no_gradient():
    s, t = _leaf(torch.randn(3, 9)), _leaf(torch.randn(3, 9))
    dispatch.kl_div(s, t).backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------- chunk ops -----


def test_chunk_ops_leave_the_autograd_gradient_in_place():
    s, t = _logits(n=7, v=33)
    scale = torch.rand(7)
    labels = torch.randint(0, 33, (7,))
    labels[2] = -100

    def autograd_grad(loss_rows_fn):
        x = _leaf(s)
        (loss_rows_fn(x) * scale).sum().backward()
        return x.grad

    buf = s.clone()
    rows, correct = reference.cross_entropy_chunk_(buf, scale, labels)
    expected_rows = F.cross_entropy(s, labels, reduction="none")
    _close(rows, expected_rows)
    _close(buf, autograd_grad(lambda x: F.cross_entropy(x, labels, reduction="none")))
    assert correct.tolist() == ((s.argmax(-1) == labels) & (labels != -100)).tolist()

    buf = s.clone()
    rows, _ = reference.kd_dense_chunk_(buf, scale, t, 2.0)
    _close(rows, reference.kl_div(s, t, 2.0, "none"))
    _close(buf, autograd_grad(lambda x: reference.kl_div(x, t, 2.0, "none")), atol=1e-7)

    ids = torch.argsort(t, -1, descending=True)[:, :6]
    lp = torch.log_softmax(torch.randn(7, 6), -1)
    buf = s.clone()
    rows, _ = reference.kd_sparse_chunk_(buf, scale, ids, lp, 2.0)
    _close(rows, reference.sparse_kl_div(s, ids, lp, 2.0, "none"))
    _close(buf, autograd_grad(lambda x: reference.sparse_kl_div(x, ids, lp, 2.0, "none")), atol=1e-7)


# ----------------------------------------------------------------------------- linear losses --


def _head(n=37, h=16, v=301, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, h, generator=g).to(dtype),
        (torch.randn(v, h, generator=g) * 0.3).to(dtype),
        (torch.randn(v, generator=g) * 0.1).to(dtype),
    )


@pytest.mark.parametrize("chunk_rows", [None, 1, 8, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_full_logits(chunk_rows, reduction):
    dispatch.configure(chunk_rows=chunk_rows)
    h, w, b = _head()
    labels = torch.randint(0, 301, (37,))
    labels[::4] = -100
    hs, ws, bs, hr, wr, br = map(_leaf, (h, w, b, h, w, b))
    loss, correct = dispatch.linear_cross_entropy(hs, ws, bs, labels, reduction, return_correct=True)
    logits = hr @ wr.T + br
    expected = F.cross_entropy(logits, labels, reduction=reduction)
    _close(loss, expected)
    keep = labels != -100
    assert correct.item() == int((logits.argmax(-1)[keep] == labels[keep]).sum())
    loss.backward()
    expected.backward()
    for a, e in ((hs, hr), (ws, wr), (bs, br)):
        _close(a.grad, e.grad, atol=1e-6)


def test_linear_cross_entropy_grad_output_scaling_and_frozen_weight():
    h, w, b = _head()
    labels = torch.randint(0, 301, (37,))
    hs, hr = _leaf(h), _leaf(h)
    (dispatch.linear_cross_entropy(hs, w, b, labels) * 3.5).backward()
    (F.cross_entropy(hr @ w.T + b, labels) * 3.5).backward()
    _close(hs.grad, hr.grad)


def test_linear_cross_entropy_no_grad_and_3d():
    h, w, b = _head(n=2 * 5)
    labels = torch.randint(0, 301, (2, 5))
    with torch.no_grad():
        loss = dispatch.linear_cross_entropy(_leaf(h).view(2, 5, 16), _leaf(w), b, labels)
    assert not loss.requires_grad
    _close(loss, F.cross_entropy(h @ w.T + b, labels.view(-1)))


def test_linear_cross_entropy_bf16_and_autocast():
    h, w, b = _head(dtype=torch.bfloat16)
    labels = torch.randint(0, 301, (37,))
    hs, ws = _leaf(h), _leaf(w)
    loss = dispatch.linear_cross_entropy(hs, ws, b, labels)
    loss.backward()
    hr, wr = _leaf(h.float()), _leaf(w.float())
    expected = F.cross_entropy((hr @ wr.T + b.float()).bfloat16().float(), labels)
    expected.backward()
    _close(loss, expected, rtol=2e-2, atol=2e-2)
    assert hs.grad.dtype == ws.grad.dtype == torch.bfloat16
    _close(hs.grad, hr.grad, rtol=2e-2, atol=2e-3)
    _close(ws.grad, wr.grad, rtol=2e-2, atol=2e-3)
    # fp32 master weights under autocast: computed in bf16, gradients come back in fp32
    h32, w32 = _leaf(h.float()), _leaf(w.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dispatch.linear_cross_entropy(h32, w32, b.float(), labels)
    loss.backward()
    assert w32.grad.dtype == torch.float32
    _close(loss, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sparse", [False, True])
def test_linear_kl_div_matches_full_logits(sparse):
    dispatch.configure(chunk_rows=5)
    h, w, b = _head(n=23, v=97)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(23, generator=g) > 0.3
    if sparse:
        ids = torch.stack([torch.randperm(97, generator=g)[:8] for _ in range(23)])
        teacher = (ids, torch.log_softmax(torch.randn(23, 8, generator=g), -1))
    else:
        teacher = torch.randn(23, 97, generator=g)
    hs, ws, bs, hr, wr, br = map(_leaf, (h, w, b, h, w, b))
    loss = dispatch.linear_kl_div(hs, ws, bs, teacher, 2.0, mask)
    logits = hr @ wr.T + br
    if sparse:
        expected = dispatch.sparse_kl_div(logits, *teacher, 2.0, "mean", mask)
    else:
        expected = dispatch.kl_div(logits, teacher, 2.0, "mean", mask)
    _close(loss, expected)
    loss.backward()
    expected.backward()
    for a, e in ((hs, hr), (ws, wr), (bs, br)):
        _close(a.grad, e.grad, atol=1e-7)


def test_default_chunk_rows():
    assert reference.default_chunk_rows(8192, 768, 30522) == 192
    assert reference.default_chunk_rows(10, 768, 30522) == 10
    assert reference.default_chunk_rows(100_000, 8, 10**9) == 1


@pytest.mark.slow
def test_compiled_reference_matches_eager():
    """configure(compile_reference=True) runs torch.compile'd references (needs a C++ compiler)."""
    h, w, b = _head(n=19, v=211)
    labels = torch.randint(0, 211, (19,))
    eager = dispatch.linear_cross_entropy(h, w, b, labels)
    x = torch.randn(4, 16)
    gelu_eager = dispatch.bias_gelu(x, b[:16])
    dispatch.configure(compile_reference=True)
    _close(dispatch.linear_cross_entropy(h, w, b, labels), eager)
    _close(dispatch.bias_gelu(x, b[:16]), gelu_eager)
