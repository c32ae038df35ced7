"""What only a CUDA GPU exercises: compiled Triton kernels, the dispatch on CUDA tensors, bf16/fp16 engines.

Every test here is marked ``cuda``: without a GPU each one is skipped with the reason "no CUDA GPU (run by
tools/gpu/check.sh on a GPU machine)" (tests/conftest.py), under CI=true too -- never counted as passing.
On CPU the same kernels are checked through Triton's interpreter (tests/test_kernels_triton.py); the
interpreter executes the kernels' NumPy semantics, so it cannot catch a miscompiled kernel, the GPU's
approximate fp32 exp / sqrt / division, round-to-nearest bf16 stores (the interpreter truncates), real warp
scheduling (the in-place chunk ops), or a DeepSpeed engine in bf16/fp16.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_BOOKS, run_cli
from test_kernels_triton import run_kernel_suite

pytestmark = pytest.mark.cuda

V = 30522  # BERT's vocabulary: not a multiple of any block
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

#: (rtol, atol relative to max|expected|) per dtype: the table of tests/interpreted_kernel_checks.py (which
#: cannot be imported: it skips itself at module level outside its two modes), derived from each dtype's
#: rounding in docs/kernels.md.  fp32 results are compared with a float64 oracle; bf16 / fp16 results with
#: the reference evaluated in fp32 on the same rounded inputs.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
#: Losses are fp32 differences of log-sum-exps (~log V): their absolute error is ~ulp(log V) (docs/kernels.md).
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    rtol, atol = TOL[dtype]
    scale = max(expected.detach().float().abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=rtol, atol=atol * scale)


def _oracle(t: torch.Tensor) -> torch.Tensor:
    """What the reference runs on: float64 for fp32 inputs, fp32 on the same rounded values for bf16 / fp16."""
    return t.detach().double() if t.dtype == torch.float32 else t.detach().float()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def _spy(monkeypatch, module, name: str) -> list[tuple]:
    """Wrap ``module.name`` (what kernels.dispatch calls) and record (shape, dtype) of its first argument."""
    calls: list[tuple] = []
    original = getattr(module, name)

    def wrapped(first, *args, **kwargs):
        calls.append((tuple(first.shape), first.dtype))
        return original(first, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


class _Launches:
    """Stands in for a ``@triton.jit`` kernel in its module (looked up there at each launch): counts
    ``kernel[grid](...)`` launches and checks they get CUDA tensors."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.count += 1
            assert all(a.is_cuda for a in args if isinstance(a, torch.Tensor)), "a Triton launch got CPU tensors"
            return launch(*args, **kwargs)

        return counted


def _launches(monkeypatch, module, *names: str) -> dict[str, _Launches]:
    counters = {name: _Launches(getattr(module, name)) for name in names}
    for name, counter in counters.items():
        monkeypatch.setattr(module, name, counter)
    return counters


@pytest.fixture
def dispatch():
    """kernels.dispatch with its default options (Triton on), restored afterwards."""
    from kernels import dispatch

    dispatch.configure()
    yield dispatch
    dispatch.configure()


def _compiled(module) -> None:
    assert not module.INTERPRETED, f"{module.__name__} was imported interpreted: unset TRITON_INTERPRET"


# ----------------------------------------------------------------------------- compiled kernels


@pytest.mark.slow
def test_kernel_suite_compiled_on_gpu():
    """The whole kernel suite (tests/interpreted_kernel_checks.py: every kernel, forward and gradients, the tiny
    BERT training check) with the real Triton compiler on the GPU, in a fresh interpreter (Triton fixes
    interpreted-or-compiled at import).  Fails if any of it fails or is skipped."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["WELLREAD_KERNEL_DEVICE"] = "cuda"
    run_kernel_suite(env, "GPU kernel suite")


# ----------------------------------------------------------------------------- the dispatch on CUDA


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backend_for_cuda_tensors_is_triton(dispatch, dtype):
    """CUDA tensors of every kernel dtype choose Triton (the point of the GPU path); switched off, the reference."""
    x = torch.zeros(4, 8, device="cuda", dtype=dtype)
    assert dispatch.backend_for(x) == "triton"
    assert dispatch.backend_for(x, x) == "triton"
    dispatch.configure(use_triton=False)
    assert dispatch.backend_for(x) == "reference"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatch_layer_norm_launches_triton(monkeypatch, dispatch, dtype):
    """dispatch.layer_norm on CUDA runs triton_layer_norm.layer_norm (one forward and one backward kernel
    launch) and matches kernels.reference.layer_norm, forward and all three gradients."""
    from kernels import reference, triton_layer_norm

    _compiled(triton_layer_norm)
    calls = _spy(monkeypatch, triton_layer_norm, "layer_norm")
    kernels = _launches(monkeypatch, triton_layer_norm, "layer_norm_fwd_kernel", "layer_norm_bwd_kernel")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (_randn(gen, 3, 37, 768) * 3 + 1).to(dtype)
    w, b, g = _randn(gen, 768, dtype=dtype), _randn(gen, 768, dtype=dtype), _randn(gen, 3, 37, 768, dtype=dtype)
    assert dispatch.backend_for(x) == "triton"
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    xr, wr, br = _leaf(_oracle(x)), _leaf(_oracle(w)), _leaf(_oracle(b))
    y = dispatch.layer_norm(xs, ws, bs, 1e-12)
    y_ref = reference.layer_norm(xr, wr, br, 1e-12)
    grads = torch.autograd.grad(y, [xs, ws, bs], g)
    grads_ref = torch.autograd.grad(y_ref, [xr, wr, br], _oracle(g))
    torch.cuda.synchronize()
    assert calls == [((3, 37, 768), dtype)]
    assert {name: k.count for name, k in kernels.items()} == {"layer_norm_fwd_kernel": 1, "layer_norm_bwd_kernel": 1}
    assert y.is_cuda and y.dtype == dtype and type(y.grad_fn).__name__ == "LayerNormFunctionBackward"
    assert_close(y, y_ref, dtype)
    for a, e in zip(grads, grads_ref):
        assert a.dtype == dtype
        assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatch_bias_gelu_launches_triton(monkeypatch, dispatch, dtype):
    """dispatch.bias_gelu on CUDA runs triton_bias_gelu.bias_gelu (forward and backward kernel) and matches
    kernels.reference.bias_gelu, forward and both gradients."""
    from kernels import reference, triton_bias_gelu

    _compiled(triton_bias_gelu)
    calls = _spy(monkeypatch, triton_bias_gelu, "bias_gelu")
    kernels = _launches(monkeypatch, triton_bias_gelu, "bias_gelu_fwd_kernel", "bias_gelu_bwd_kernel")
    gen = torch.Generator(device="cuda").manual_seed(1)
    x, b = _randn(gen, 2, 37, 512, scale=2.0, dtype=dtype), _randn(gen, 512, dtype=dtype)
    g = _randn(gen, 2, 37, 512, dtype=dtype)
    assert dispatch.backend_for(x) == "triton"
    xs, bs, xr, br = _leaf(x), _leaf(b), _leaf(_oracle(x)), _leaf(_oracle(b))
    y = dispatch.bias_gelu(xs, bs)
    y_ref = reference.bias_gelu(xr, br)
    grads = torch.autograd.grad(y, [xs, bs], g)
    grads_ref = torch.autograd.grad(y_ref, [xr, br], _oracle(g))
    torch.cuda.synchronize()
    assert calls == [((2, 37, 512), dtype)]
    assert {name: k.count for name, k in kernels.items()} == {"bias_gelu_fwd_kernel": 1, "bias_gelu_bwd_kernel": 1}
    assert y.is_cuda and y.dtype == dtype and type(y.grad_fn).__name__ == "BiasGeluFunctionBackward"
    assert_close(y, y_ref, dtype)
    for a, e in zip(grads, grads_ref):
        assert a.dtype == dtype
        assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatch_kl_div_launches_triton(monkeypatch, dispatch, dtype):
    """dispatch.kl_div on CUDA (BERT vocabulary, a masked row) runs triton_distillation.distill_dense (one
    kernel launch: the gradient is computed in the forward) and matches kernels.reference.kl_div."""
    from kernels import reference, triton_distillation

    _compiled(triton_distillation)
    calls = _spy(monkeypatch, triton_distillation, "distill_dense")
    kernels = _launches(monkeypatch, triton_distillation, "kd_dense_fwd_grad_kernel")
    gen = torch.Generator(device="cuda").manual_seed(2)
    s, t = _randn(gen, 13, V, scale=4.0, dtype=dtype), _randn(gen, 13, V, scale=4.0, dtype=dtype)
    mask = torch.ones(13, dtype=torch.bool, device="cuda")
    mask[1] = False
    assert dispatch.backend_for(s, t) == "triton"
    ss, sr = _leaf(s), _leaf(_oracle(s))
    loss = dispatch.kl_div(ss, t, 2.0, "mean", mask)
    loss_ref = reference.kl_div(sr, _oracle(t), 2.0, "mean", mask)
    (grad,), (grad_ref,) = torch.autograd.grad(loss, [ss]), torch.autograd.grad(loss_ref, [sr])
    torch.cuda.synchronize()
    assert calls == [((13, V), dtype)]
    assert kernels["kd_dense_fwd_grad_kernel"].count == 1
    assert loss.dtype == torch.float32 and type(loss.grad_fn).__name__ == "DenseDistillFunctionBackward"
    torch.testing.assert_close(loss.double(), loss_ref.double(), **LOSS_TOL)  # fp32 math on identical inputs
    assert grad.dtype == dtype
    assert_close(grad, grad_ref, dtype)
    assert grad[1].abs().max() == 0  # the masked row gets no gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatch_linear_cross_entropy_launches_triton(monkeypatch, dispatch, dtype):
    """dispatch.linear_cross_entropy on CUDA runs triton_cross_entropy.cross_entropy_chunk_ once per chunk
    (50 rows in chunks of 16) and matches kernels.reference.linear_cross_entropy on the same inputs (the CPU
    path: same chunk matmuls, PyTorch chunk op); fp32 also matches a float64 F.cross_entropy oracle."""
    from kernels import reference, triton_cross_entropy

    _compiled(triton_cross_entropy)
    calls = _spy(monkeypatch, triton_cross_entropy, "cross_entropy_chunk_")
    kernels = _launches(monkeypatch, triton_cross_entropy, "cross_entropy_fwd_grad_kernel")
    dispatch.configure(chunk_rows=16)
    gen = torch.Generator(device="cuda").manual_seed(3)
    h, w = _randn(gen, 50, 64, dtype=dtype), _randn(gen, V, 64, scale=0.2, dtype=dtype)
    b = _randn(gen, V, scale=0.1, dtype=dtype)
    labels = torch.randint(0, V, (50,), generator=gen, device="cuda")
    labels[::3] = -100
    labels[1] = int((h[1].double() @ w.double().T + b.double()).argmax())  # at least one correct prediction
    assert dispatch.backend_for(h, w) == "triton"
    hs, ws, bs = _leaf(h), _leaf(w), _leaf(b)
    loss, correct = dispatch.linear_cross_entropy(hs, ws, bs, labels, return_correct=True)
    grads = torch.autograd.grad(loss, [hs, ws, bs])
    torch.cuda.synchronize()
    assert calls == [((16, V), dtype)] * 3 + [((2, V), dtype)]
    assert kernels["cross_entropy_fwd_grad_kernel"].count == 4
    for a in grads:
        assert a.dtype == dtype
    # the reference path on the same inputs: identical chunk matmuls, the PyTorch chunk op
    hp, wp, bp = _leaf(h), _leaf(w), _leaf(b)
    loss_path, correct_path = reference.linear_cross_entropy(hp, wp, bp, labels, return_correct=True, chunk_rows=16)
    torch.testing.assert_close(loss.double(), loss_path.double(), **LOSS_TOL)
    for a, e in zip(grads, torch.autograd.grad(loss_path, [hp, wp, bp])):
        assert_close(a, e, dtype)
    # argmax hits: the reference counts a label tied with the row max, the kernel the first maximal index only
    # (ties are frequent among bf16 / fp16 logits, never seen among fp32 ones)
    assert int(correct) <= int(correct_path)
    if dtype == torch.float32:
        hr, wr, br = _leaf(h.double()), _leaf(w.double()), _leaf(b.double())
        logits = hr @ wr.T + br
        loss_ref = F.cross_entropy(logits, labels)
        torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
        keep = labels != -100
        assert int(correct) == int((logits.argmax(-1)[keep] == labels[keep]).sum()) >= 1
        for a, e in zip(grads, torch.autograd.grad(loss_ref, [hr, wr, br])):
            assert_close(a, e)


# ----------------------------------------------------------------------------- a whole training step

#: fp32: the loss and the gradient norm are sums over ~1e5 and more rounded terms (30,522 logits per labelled
#: token, 4.2M gradient entries); fp32 rounding errors of such sums grow like sqrt(n) * 2**-24 ~ 2e-5, and the
#: fused and plain paths sum in different orders: rtol 1e-4.  bf16 autocast: both sides round the matmul inputs
#: to bf16 (unit roundoff 2**-8 = 3.9e-3) but at different places (the plain model adds the intermediate bias and
#: applies GELU in bf16, the fused kernel in fp32; the chunked head computes its own bf16 logits), so single
#: values differ by bf16 ulps: rtol 2e-2, the bf16-autocast tolerance of tests/test_kernels_reference.py.
STEP_RTOL = {"fp32": 1e-4, "bf16-autocast": 2e-2}


def _total_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_bert_training_step_with_kernels_matches_plain(monkeypatch, dispatch, precision):
    """One AdamW step of a small BertForMaskedLM patched with fuse_bert + fused_mlm_loss (Triton LayerNorm,
    bias-GELU and cross-entropy on the GPU) agrees with the unpatched model's own `labels=` loss: loss and total
    gradient norm within STEP_RTOL, and after the step every weight within Adam's hard bound of the other."""
    from transformers import BertConfig, BertForMaskedLM

    from kernels import triton_bias_gelu, triton_cross_entropy, triton_layer_norm
    from kernels.patch import fuse_bert, fused_mlm_loss

    for module in (triton_layer_norm, triton_bias_gelu, triton_cross_entropy):
        _compiled(module)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=V,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    plain = BertForMaskedLM(config).cuda()
    fused = fuse_bert(copy.deepcopy(plain))
    gen = torch.Generator(device="cuda").manual_seed(4)
    ids = torch.randint(0, V, (4, 32), generator=gen, device="cuda")
    labels = torch.full_like(ids, -100)
    labels[:, 1::4] = ids[:, 1::4]
    ln = _spy(monkeypatch, triton_layer_norm, "layer_norm")
    gelu = _spy(monkeypatch, triton_bias_gelu, "bias_gelu")
    ce = _spy(monkeypatch, triton_cross_entropy, "cross_entropy_chunk_")
    lr = 1e-3
    opt_plain, opt_fused = torch.optim.AdamW(plain.parameters(), lr=lr), torch.optim.AdamW(fused.parameters(), lr=lr)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision != "fp32"):
        loss_plain = plain(input_ids=ids, labels=labels).loss
        loss_fused = fused_mlm_loss(fused, fused.bert(input_ids=ids).last_hidden_state, labels)
    loss_plain.backward()
    loss_fused.backward()
    norm_plain, norm_fused = _total_grad_norm(plain), _total_grad_norm(fused)
    opt_plain.step()
    opt_fused.step()
    torch.cuda.synchronize()
    assert len(ln) == 6  # embeddings + 2 per layer x 2 layers + MLM head transform
    assert len(gelu) == 2 and len(ce) >= 1
    if precision == "bf16-autocast":
        assert {dtype for _, dtype in gelu} == {torch.bfloat16}  # the intermediate matmul ran in bf16
        assert {dtype for _, dtype in ce} == {torch.bfloat16}  # so did the head's logits
    rtol = STEP_RTOL[precision]
    assert math.isfinite(loss_plain.item()) and math.isfinite(norm_plain.item())
    torch.testing.assert_close(loss_fused.float(), loss_plain.float(), rtol=rtol, atol=0, msg="loss")
    torch.testing.assert_close(norm_fused, norm_plain, rtol=rtol, atol=0, msg="total gradient norm")
    # Adam's first step moves each weight by lr * g / (|g| + eps), less than lr whatever the gradient, and the
    # weight decay is the same on both sides: the two models stay within 2 lr (+ rounding of the update).
    for (name, p_plain), p_fused in zip(plain.named_parameters(), fused.parameters()):
        diff = (p_fused - p_plain).detach().abs().max().item()
        assert diff <= 2 * lr + 1e-6, (name, diff)


# ----------------------------------------------------------------------------- DeepSpeed in bf16 / fp16

ENGINE_STEPS = 3


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """One demo book packed into 64-token sequences (as in tests/test_pretrain.py)."""
    from trainer.data.preprocess import PackOptions, preprocess
    from trainer.data.text_sources import SourceSpec

    out = tmp_path_factory.mktemp("cuda-corpus") / "books"
    preprocess(
        SourceSpec(files=DEMO_BOOKS[:1], strip_gutenberg=True), out, None, PackOptions(seq_len=64), progress=False
    )
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    """Tensor name -> dtype code, from the file's JSON header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "ds_config,stage,torch_name,st_code",
    [("zero1_bf16", 1, "bfloat16", "BF16"), ("zero2_fp16", 2, "float16", "F16")],
    ids=["zero1_bf16", "zero2_fp16"],
)
def test_deepspeed_engine_trains_in_low_precision(tmp_path, tiny_corpus, ds_config, stage, torch_name, st_code):
    """`wellread pretrain` (the real CLI, one GPU) with a bf16 / fp16 DeepSpeed config: 3 steps of bert-L2-H128
    finish with finite losses, CUDA memory logged, and the model DeepSpeed trained -- the exported weights are
    the engine's own parameters -- is in bf16 / fp16 (DeepSpeed casts the module; fp32 masters stay in the
    optimizer).  The fused kernels run inside it on bf16 / fp16 activations.  fp16 needs a GPU at all (the
    engine refuses it on CPU); bf16 on CPU is covered by tests/test_pretrain.py."""
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(f"""
data: {{train: {tiny_corpus}, eval: {tiny_corpus}, eval_max_sequences: 32, verify: size}}
model: {{name: bert-L2-H128, dropout: 0.0}}
train: {{steps: {ENGINE_STEPS}, micro_batch: 8, global_batch: 16, lr: 2.0e-3, warmup_steps: 1, seed: 11}}
engine: {{ds_config: zero2}}
run: {{log_every: 1, ckpt_every: 0, tensorboard: false}}
""")
    out = tmp_path / "run"
    proc = run_cli(
        "pretrain",
        str(recipe),
        f"engine.ds_config={ds_config}",
        f"run.out_dir={out}",
        env={"WELLREAD_CACHE": str(tmp_path / "cache")},
        timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f"ZeRO stage {stage}," in proc.stderr, proc.stderr[-3000:]
    train = {r["step"]: r for r in _records(out) if "train/loss" in r}
    assert sorted(train) == list(range(1, ENGINE_STEPS + 1))
    for step, r in train.items():
        assert math.isfinite(r["train/loss"]), (step, r)
        assert r["train/cuda_max_allocated_mb"] > 0, (step, r)  # log_every 1: the memory fields every step
    skipped = [train[s]["train/skipped"] for s in sorted(train)]
    if torch_name == "bfloat16":
        assert skipped == [0.0] * ENGINE_STEPS, skipped  # bf16 has fp32's range: no loss scaling, no overflow
    else:
        # fp16's dynamic loss scaler (initial scale 2**16, hysteresis 2) may skip a step on overflow, not all
        assert sum(skipped) < ENGINE_STEPS, skipped
    for s in sorted(train):
        if not train[s]["train/skipped"]:
            norm = train[s]["train/grad_norm"]
            assert norm is not None and math.isfinite(norm) and norm > 0, (s, norm)
    evals = [r for r in _records(out) if "eval/loss" in r]
    assert evals and math.isfinite(evals[-1]["eval/loss"]), evals
    export = out / "export"
    config = json.loads((export / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == torch_name, config
    dtypes = _safetensors_dtypes(export / "model.safetensors")
    floating = {name: code for name, code in dtypes.items() if code in ("F64", "F32", "F16", "BF16")}
    assert floating and set(floating.values()) == {st_code}, floating
