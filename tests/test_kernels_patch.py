"""fuse_bert keeps parameters, state_dict and checkpoints identical and the outputs unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from kernels import dispatch
from kernels.patch import FusedBertIntermediate, FusedLayerNorm, fuse_bert, fused_mlm_loss, unfuse_bert


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch.configure()


def _config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=211,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=32,
        num_labels=3,
    )
    values.update(overrides)
    return BertConfig(**values)


def _inputs(batch: int = 2, seq: int = 11):
    torch.manual_seed(0)
    return torch.randint(0, 211, (batch, seq)), torch.ones(batch, seq, dtype=torch.long)


@pytest.mark.parametrize("cls", [BertModel, BertForMaskedLM, BertForSequenceClassification])
def test_fuse_bert_keeps_parameters_and_outputs(cls):
    torch.manual_seed(0)
    plain = cls(_config()).eval()
    fused = fuse_bert(copy.deepcopy(plain))
    layer_norms = [m for m in fused.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert layer_norms and all(type(m) is FusedLayerNorm for m in layer_norms)
    assert sum(type(m) is FusedBertIntermediate for m in fused.modules()) == 2
    assert list(plain.state_dict()) == list(fused.state_dict())
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), name
    ids, attn = _inputs()
    with torch.no_grad():
        out_plain, out_fused = (
            plain(input_ids=ids, attention_mask=attn),
            fused(input_ids=ids, attention_mask=attn),
        )
    key = "last_hidden_state" if cls is BertModel else "logits"
    torch.testing.assert_close(out_fused[key], out_plain[key], rtol=1e-5, atol=1e-5)


def test_fuse_bert_is_in_place_and_keeps_parameter_objects():
    model = BertModel(_config())
    params = {name: id(p) for name, p in model.named_parameters()}
    assert fuse_bert(model) is model
    assert params == {name: id(p) for name, p in model.named_parameters()}
    unfuse_bert(model)
    assert not any(type(m) in (FusedLayerNorm, FusedBertIntermediate) for m in model.modules())


def test_non_exact_gelu_is_left_alone():
    model = fuse_bert(BertModel(_config(hidden_act="gelu_new")))
    assert not any(type(m) is FusedBertIntermediate for m in model.modules())
    assert any(type(m) is FusedLayerNorm for m in model.modules())


def test_save_pretrained_loads_in_plain_transformers(tmp_path):
    torch.manual_seed(0)
    fused = fuse_bert(BertForMaskedLM(_config())).eval()
    fused.save_pretrained(tmp_path)
    plain = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert not any(type(m) in (FusedLayerNorm, FusedBertIntermediate) for m in plain.modules())
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    ids, attn = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_fused_mlm_loss_matches_transformers_loss():
    torch.manual_seed(0)
    model = fuse_bert(BertForMaskedLM(_config())).eval()
    ids, attn = _inputs()
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    expected = model(input_ids=ids, attention_mask=attn, labels=labels)
    sequence = model.bert(input_ids=ids, attention_mask=attn).last_hidden_state
    loss, correct = fused_mlm_loss(model, sequence, labels, return_correct=True)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
    keep = labels != -100
    assert correct.item() == int((expected.logits.argmax(-1)[keep] == labels[keep]).sum())
    loss.backward()
    # Every gradient is the one transformers' own loss gives, the tied decoder's share of the embedding matrix
    # included (that matrix gets a gradient from the input lookup anyway, so "not None" proved nothing).  Both
    # sides run the same fused encoder on the same weights; only the head sums in another order.  fp32, unit
    # roundoff u = 2**-24; the longest sums behind a gradient here: 211 vocabulary terms (softmax normaliser)
    # and 22 tokens, so each side is within ~211 u = 1.3e-5 of exact, relative to the gradient tensor's scale:
    # rtol 1e-5 and atol 3e-5 x max|g| per tensor (breaking the decoder's gradient moves the embedding's by O(1)),
    # plus a noise floor of 1e-6 x the largest gradient for the attention key biases, whose exact gradient is 0.
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected.loss.backward()
    floor = 1e-6 * max(p.grad.abs().max().item() for p in model.parameters())
    for name, p in model.named_parameters():
        atol = 3e-5 * p.grad.abs().max().item() + floor
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
