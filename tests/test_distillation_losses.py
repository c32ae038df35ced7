"""Distillation loss terms, layer maps and `wellread init-student`.

Every loss is checked against the maths written out in numpy float64 here (never by calling the function under
test), its gradient by torch.autograd.gradcheck in float64 (the CPU reference path keeps float64) or by the
analytic formula. Tolerances: float64 results against float64 numpy agree to ~1e-15 relative per term; with at
most a few hundred terms summed, rtol 1e-10 leaves a wide margin for any BLAS / libm. float32 paths (the chunked
linear loss computes in fp32 by design) get rtol 1e-5 = ~100 ulp of fp32 (eps 1.2e-7), a bound on log-softmax
over <= 64 classes summed over <= 64 rows, plus atol 1e-5 * rows for sums that cancel toward zero.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from kernels.dispatch import triton_unavailable
from trainer.cli import main as cli_main
from trainer.models.distillation import (
    HiddenProjection,
    cosine_loss_sum,
    distilbert_layers,
    kd_loss_sum,
    linear_kd_loss_sum,
    pkd_layer_map,
    pkd_loss_sum,
    sparse_kd_loss_sum,
)

F64_RTOL = 1e-10
F32_RTOL = 1e-5


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_kd_rows(s: np.ndarray, t: np.ndarray, temp: float) -> np.ndarray:
    """T^2 * sum_c p_c (log p_c - log q_c), p = softmax(t / T), q = softmax(s / T), per row."""
    log_p, log_q = np_log_softmax(t / temp), np_log_softmax(s / temp)
    return temp**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)


def logits(*shape: int, seed: int, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------- KD ----------


@pytest.mark.parametrize("temp", [1.0, 2.0, 10.0])
def test_kd_matches_numpy_float64(temp):
    s, t = logits(6, 11, seed=0), logits(6, 11, seed=1)
    expected = np_kd_rows(s.numpy(), t.numpy(), temp).sum()
    got = kd_loss_sum(s, t, temp)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=F64_RTOL)


def test_kd_float32_within_fp32_rounding():
    s, t = logits(8, 64, seed=2), logits(8, 64, seed=3)
    expected = np_kd_rows(s.numpy(), t.numpy(), 2.0).sum()
    got = kd_loss_sum(s.float(), t.float(), 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=F32_RTOL, abs=1e-5 * 8)


def test_kd_mask_keeps_rows_and_accepts_leading_dims():
    s, t = logits(2, 3, 9, seed=4), logits(2, 3, 9, seed=5)
    s[1, 2] = 1e4  # a padded row with garbage logits: must neither count nor get gradient
    s.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = np_kd_rows(s.detach().numpy(), t.numpy(), 3.0)
    expected = (rows * mask.numpy()).sum()
    got = kd_loss_sum(s, t, 3.0, mask=mask)
    assert got.item() == pytest.approx(expected, rel=F64_RTOL)
    got.backward()
    assert torch.all(s.grad[mask == 0] == 0)
    assert torch.all(s.grad[mask == 1].abs().sum(-1) > 0)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_gradient_analytic_and_gradcheck(temp):
    s, t = logits(5, 7, seed=6).requires_grad_(True), logits(5, 7, seed=7)
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    kd_loss_sum(s, t, temp, mask).backward()
    sn, tn = s.detach().numpy(), t.numpy()
    analytic = temp * (np.exp(np_log_softmax(sn / temp)) - np.exp(np_log_softmax(tn / temp)))
    analytic *= mask.numpy()[:, None]
    np.testing.assert_allclose(s.grad.numpy(), analytic, rtol=F64_RTOL, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: kd_loss_sum(x, t, temp, mask), (s.detach().requires_grad_(),))


def test_t_squared_keeps_gradient_magnitude_across_temperatures():
    """Hinton et al.: with the T^2 factor the gradient tends to the logit-matching limit
    (centred s - centred t) / C as T grows; without it the gradient would shrink like 1 / T^2."""
    s, t = logits(4, 10, seed=8, scale=1.0), logits(4, 10, seed=9, scale=1.0)
    norms = {}
    for temp in (1.0, 2.0, 5.0, 20.0, 1000.0):
        x = s.clone().requires_grad_(True)
        kd_loss_sum(x, t, temp).backward()
        norms[temp] = x.grad.norm().item()
        if temp == 1000.0:
            limit = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / s.shape[-1]
            # the next term of the expansion is O(|logits|^2 / T): 1e-3 relative at T = 1000, |logits| ~ 1
            torch.testing.assert_close(x.grad, limit, rtol=0, atol=1e-2 * limit.abs().max().item())
    assert max(norms.values()) / min(norms.values()) < 1.25, norms  # measured 1.04 for these logits
    x = s.clone().requires_grad_(True)
    (kd_loss_sum(x, t, 20.0) / 20.0**2).backward()  # the raw KL: a ~T^2 smaller gradient
    assert x.grad.norm().item() < norms[20.0] / 100


# ------------------------------------------------------------------------ sparse KD ----------


def np_sparse_rows(s: np.ndarray, ids: np.ndarray, lp: np.ndarray, temp: float) -> np.ndarray:
    """Teacher renormalised over the stored k: p_j = softmax(lp / T)_j; KL to the student at ids."""
    log_p = np_log_softmax(lp / temp)
    log_q = np.take_along_axis(np_log_softmax(s / temp), ids, axis=-1)
    return temp**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)


def topk_teacher(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp, ids = torch.log_softmax(t, -1).topk(k, dim=-1)
    return ids, lp


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_sparse_kd_matches_numpy_and_renormalises(temp):
    s, t = logits(6, 20, seed=10), logits(6, 20, seed=11)
    ids, lp = topk_teacher(t, 5)
    mask = torch.tensor([1, 1, 0, 1, 1, 1])
    expected = (np_sparse_rows(s.numpy(), ids.numpy(), lp.numpy(), temp) * mask.numpy()).sum()
    got = sparse_kd_loss_sum(s, ids, lp, temp, mask)
    assert got.item() == pytest.approx(expected, rel=F64_RTOL)
    # renormalised: shifting the stored log-probs by a per-row constant (the missing mass) changes nothing
    shifted = sparse_kd_loss_sum(s, ids, lp - torch.rand(6, 1, dtype=torch.float64), temp, mask)
    assert shifted.item() == pytest.approx(expected, rel=F64_RTOL)
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: sparse_kd_loss_sum(v, ids, lp, temp, mask), (x,))


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_sparse_kd_with_k_equal_vocab_equals_dense(temp):
    s, t = logits(7, 13, seed=12), logits(7, 13, seed=13)
    ids, lp = topk_teacher(t, 13)  # every token, in a shuffled (sorted by prob) order
    xs, xd = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    sparse, dense = sparse_kd_loss_sum(xs, ids, lp, temp), kd_loss_sum(xd, t, temp)
    assert sparse.item() == pytest.approx(dense.item(), rel=F64_RTOL)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(xs.grad, xd.grad, rtol=F64_RTOL, atol=1e-14)


def test_linear_kd_equals_kd_on_materialised_logits():
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    weight = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_(True)
    bias = torch.randn(40, generator=g, requires_grad=True)
    teacher = torch.randn(10, 40, generator=g) * 2
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    ids, lp = topk_teacher(teacher, 8)
    for target, dense_fn in (
        (teacher, lambda z: kd_loss_sum(z, teacher, 2.0, mask)),
        ((ids, lp), lambda z: sparse_kd_loss_sum(z, ids, lp, 2.0, mask)),
    ):
        got = linear_kd_loss_sum(hidden, weight, bias, target, 2.0, mask)
        grads = torch.autograd.grad(got, (hidden, weight, bias))
        want = dense_fn(F.linear(hidden, weight, bias))
        want_grads = torch.autograd.grad(want, (hidden, weight, bias))
        assert got.item() == pytest.approx(want.item(), rel=F32_RTOL, abs=1e-5 * 10)
        for a, b in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=F32_RTOL, atol=1e-5)


def test_kd_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss_sum(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="mask has 3 entries for 2 rows"):
        kd_loss_sum(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, torch.ones(3))
    with pytest.raises(ValueError, match="top-k rows"):
        sparse_kd_loss_sum(torch.zeros(2, 9), torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4), 1.0)


# --------------------------------------------------------------------------- cosine ----------


def test_cosine_matches_numpy_and_the_library_loss():
    s, t = logits(2, 5, 8, seed=15), logits(2, 5, 8, seed=16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    sn, tn = s.numpy(), t.numpy()
    cos = (sn * tn).sum(-1) / (np.linalg.norm(sn, axis=-1) * np.linalg.norm(tn, axis=-1))
    expected = ((1 - cos) * mask.numpy()).sum()
    got = cosine_loss_sum(s, t, mask)
    assert got.item() == pytest.approx(expected, rel=F64_RTOL)
    # DistilBERT's own formulation: CosineEmbeddingLoss(target 1) on the non-pad rows, as a sum
    keep = mask.bool()
    library = torch.nn.CosineEmbeddingLoss(reduction="sum")(s[keep], t[keep], torch.ones(int(keep.sum())))
    assert got.item() == pytest.approx(library.item(), rel=F64_RTOL)
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: cosine_loss_sum(v, t, mask), (x,))


def test_cosine_all_zero_pad_rows_give_finite_zero_gradient():
    s, t = logits(1, 4, 6, seed=17).requires_grad_(True), logits(1, 4, 6, seed=18)
    with torch.no_grad():
        s[0, 3] = 0
    mask = torch.tensor([[1, 1, 1, 0]])
    cosine_loss_sum(s, t, mask).backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[0, 3] == 0)


def test_width_mismatch_needs_a_projection():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"student hidden size 4 != teacher hidden size 6.*HiddenProjection\(4, 6\)"):
        cosine_loss_sum(s, t, mask)
    with pytest.raises(ValueError, match="HiddenProjection"):
        pkd_loss_sum([s[:, 0]], [t[:, 0]])
    proj = HiddenProjection(4, 6)
    assert isinstance(proj, torch.nn.Linear) and proj.weight.shape == (6, 4)
    cosine_loss_sum(proj(s), t, mask).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ PKD ----------


def test_pkd_matches_numpy_paper_code_and_gradcheck():
    student = [logits(4, 8, seed=20 + m) for m in range(3)]
    teacher = [logits(4, 8, seed=30 + m) for m in range(3)]
    expected = 0.0
    for s, t in zip(student, teacher, strict=True):
        sn, tn = s.numpy(), t.numpy()
        diff = sn / np.linalg.norm(sn, axis=-1, keepdims=True) - tn / np.linalg.norm(tn, axis=-1, keepdims=True)
        expected += (diff**2).sum()
    got = pkd_loss_sum(student, teacher)
    assert got.item() == pytest.approx(expected, rel=F64_RTOL)
    # PKD's code: F.mse_loss (mean over B x M x H) of the stacked normalised vectors; ours divided by the loop's
    # B is that mean times M * H (the module docstring's beta_ours = beta_paper / (M * H))
    stack_s = F.normalize(torch.stack(student, 1), dim=2)
    stack_t = F.normalize(torch.stack(teacher, 1), dim=2)
    paper = F.mse_loss(stack_s, stack_t)
    b, m, h = stack_s.shape
    assert (got / b).item() == pytest.approx(paper.item() * m * h, rel=F64_RTOL)
    xs = tuple(s.clone().requires_grad_(True) for s in student)
    assert torch.autograd.gradcheck(lambda *v: pkd_loss_sum(list(v), teacher), xs)


def test_pkd_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="2 student layers vs 1 teacher"):
        pkd_loss_sum([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="no mapped layers"):
        pkd_loss_sum([], [])


# ----------------------------------------------------------------------- layer maps ----------


@pytest.mark.parametrize(
    ("teacher", "student", "skip", "last"),
    [
        (12, 6, [2, 4, 6, 8, 10], [7, 8, 9, 10, 11]),  # the PKD paper's maps
        (12, 3, [4, 8], [10, 11]),
        (24, 6, [4, 8, 12, 16, 20], [19, 20, 21, 22, 23]),
        (6, 2, [3], [5]),
    ],
)
def test_pkd_layer_maps(teacher, student, skip, last):
    assert pkd_layer_map(teacher, student, "skip") == list(zip(range(1, student), skip, strict=True))
    assert pkd_layer_map(teacher, student, "last") == list(zip(range(1, student), last, strict=True))


def test_pkd_layer_map_errors():
    assert pkd_layer_map(12, 1, "skip") == []
    with pytest.raises(ValueError, match=r"1\.\.6"):
        pkd_layer_map(6, 7, "skip")
    with pytest.raises(ValueError, match="got 0"):
        pkd_layer_map(6, 0, "last")
    with pytest.raises(ValueError, match="'skip' or 'last'"):
        pkd_layer_map(12, 6, "first")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [
        (12, 6, [0, 2, 4, 7, 9, 11]),  # DistilBERT's extraction script
        (24, 6, [0, 5, 9, 14, 18, 23]),  # i * 23/5 = 0, 4.6, 9.2, 13.8, 18.4, 23
        (12, 3, [0, 6, 11]),  # 5.5 rounds up
        (6, 3, [0, 3, 5]),
        (6, 2, [0, 5]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (12, 1, [0]),
    ],
)
def test_distilbert_layers(teacher, student, expected):
    assert distilbert_layers(teacher, student) == expected


def test_distilbert_layers_errors():
    with pytest.raises(ValueError):
        distilbert_layers(6, 7)
    with pytest.raises(ValueError):
        distilbert_layers(6, 0)


# --------------------------------------------------------------------- init-student ----------


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def minilm_student(tmp_path_factory, minilm_dir) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("init") / "student"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["init-student", "--teacher", "minilm", "--layers", "0,2,4", "--out", str(out)])
    assert rc == 0, err.getvalue()
    return out, err.getvalue()


def test_init_student_copies_layers_bitwise(minilm_student, minilm_dir):
    out, stderr = minilm_student
    teacher, student = tensors(minilm_dir), tensors(out)
    layers = [0, 2, 4]
    copied = 0
    for name, value in student.items():
        if name.startswith("cls."):
            continue  # MiniLM has no MLM head: fresh (checked below)
        assert name.startswith("bert.")
        src = name.removeprefix("bert.")
        if src.startswith("encoder.layer."):
            i, rest = src.removeprefix("encoder.layer.").split(".", 1)
            src = f"encoder.layer.{layers[int(i)]}.{rest}"
        assert bitwise_equal(value, teacher[src]), name
        copied += 1
    per_layer = sum(1 for k in teacher if k.startswith("encoder.layer.0."))
    assert copied == 5 + 3 * per_layer  # 5 embedding tensors + 3 layers; nothing else (no pooler)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["hidden_size"] == 384
    info = json.loads((out / "wellread.json").read_text())
    assert info["teacher_layers"] == layers and info["teacher_num_layers"] == 6 and info["mlm_head"] == "fresh"
    assert Path(info["teacher"]) == minilm_dir.resolve()
    for name in ("tokenizer.json", "vocab.txt"):
        assert (out / name).read_bytes() == (minilm_dir / name).read_bytes()
    warning = [line for line in stderr.splitlines() if "no MLM head" in line]
    assert len(warning) == 1 and "freshly initialised" in warning[0]


def test_init_student_loads_and_reproduces_the_teacher_layer(minilm_student, minilm_dir):
    from transformers import AutoModel, AutoModelForMaskedLM

    out, _ = minilm_student
    student, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.config.num_hidden_layers == 3
    teacher = AutoModel.from_pretrained(minilm_dir)
    student.eval()
    teacher.eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 2204, 102]])
    with torch.no_grad():
        hs = student.bert(input_ids=ids, output_hidden_states=True).hidden_states
        ht = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        logits_ = student(input_ids=ids).logits
    # same weights, same fp32 ops: embeddings and student layer 1 = teacher layer 1 up to fp32 kernel rounding
    torch.testing.assert_close(hs[0], ht[0])
    torch.testing.assert_close(hs[1], ht[1])
    assert logits_.shape == (1, 6, 30522) and torch.isfinite(logits_).all()


def test_init_student_copies_an_existing_mlm_head(minilm_student, tmp_path):
    teacher_dir, _ = minilm_student  # a BertForMaskedLM directory with a head and "bert." prefixes
    out = tmp_path / "s2"
    assert cli_main(["init-student", "--teacher", str(teacher_dir), "--layers", "0,2", "--out", str(out)]) == 0
    teacher, student = tensors(teacher_dir), tensors(out)
    heads = [k for k in student if k.startswith("cls.")]
    assert heads and all(bitwise_equal(student[k], teacher[k]) for k in heads)
    for rest in ("attention.self.query.weight", "output.dense.bias"):
        assert bitwise_equal(student[f"bert.encoder.layer.1.{rest}"], teacher[f"bert.encoder.layer.2.{rest}"])
    assert json.loads((out / "wellread.json").read_text())["mlm_head"] == "copied"
    # a second run replaces the directory (published atomically): the new layers, no leftover version or temp
    assert cli_main(["init-student", "--teacher", str(teacher_dir), "--layers", "1", "--out", str(out)]) == 0
    assert json.loads((out / "wellread.json").read_text())["teacher_layers"] == [1]
    assert bitwise_equal(
        tensors(out)["bert.encoder.layer.0.output.dense.bias"], teacher["bert.encoder.layer.1.output.dense.bias"]
    )
    assert [p.name for p in tmp_path.iterdir() if p.name != "s2"] == [out.resolve().name]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("0,6", "layer 6 is out of range; the teacher has layers 0..5"),
        ("1,1", "appears twice"),
        ("3,1", "must be increasing"),
        ("0,x", "comma-separated integers"),
    ],
)
def test_init_student_refuses_bad_layers(tmp_path, capsys, layers, message):
    out = tmp_path / "bad"
    assert cli_main(["init-student", "--teacher", "minilm", "--layers", layers, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wellread: error: ") and message in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------- the Triton route (CPU) ----------

TRITON_ROUTE = """
import torch
from kernels import dispatch
from trainer.models.distillation import kd_loss_sum, linear_kd_loss_sum, sparse_kd_loss_sum
torch.manual_seed(0)
V = 1000  # not a multiple of the kernels' 1024 block: the tail masking runs
s, t = torch.randn(2, 3, V) * 3, torch.randn(2, 3, V) * 3
mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
lp, ids = torch.log_softmax(t, -1).topk(8, -1)
h, w, b = torch.randn(6, 32), torch.randn(V, 32) * 0.2, torch.randn(V)
def run():
    out = {}
    for name, fn, x0 in (("kd", lambda x: kd_loss_sum(x, t, 2.0, mask), s),
                         ("sparse", lambda x: sparse_kd_loss_sum(x, ids, lp, 2.0, mask), s),
                         ("linear", lambda x: linear_kd_loss_sum(x, w, b, t.reshape(6, V), 2.0, mask.reshape(6)), h)):
        x = x0.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        out[name] = (loss.detach(), x.grad)
    return out
assert dispatch.backend_for(s) == "triton"
tri = run()
dispatch.configure(use_triton=False)
ref = run()
for k in tri:
    torch.testing.assert_close(tri[k][0], ref[k][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri[k][1], ref[k][1], rtol=1e-5, atol=1e-6 * ref[k][1].abs().max().item())
print("OK")
"""


def test_loss_terms_through_the_triton_kernels_match_the_reference():
    """The GPU route (Triton kernels, here run by Triton's CPU interpreter) with reduction="sum", a row mask
    and leading dims, against the reference path; fp32 tolerances as in tests/interpreted_kernel_checks.py."""
    if (why := triton_unavailable()) is not None:
        pytest.skip(why)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_ROUTE],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
