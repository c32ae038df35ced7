"""Route a Hugging Face BERT through the fused ops without changing its parameters or state_dict.

``fuse_bert`` swaps the *class* of the ``nn.LayerNorm`` and ``BertIntermediate`` modules in place
for subclasses whose ``forward`` calls ``kernels.dispatch``.  Parameters, buffers, hooks, module
names and ``state_dict`` keys stay exactly the same object/names, so optimizers built before or
after patching, DeepSpeed's parameter bookkeeping and ``save_pretrained`` checkpoints (loadable by
plain transformers) are unaffected.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import GELUActivation
from transformers.models.bert.modeling_bert import BertIntermediate

from kernels import dispatch
from kernels.reference import IGNORE_INDEX


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by ``kernels.dispatch.layer_norm`` (same parameters)."""

    def forward(self, input: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1 or self.weight is None or self.bias is None:
            return super().forward(input)
        return dispatch.layer_norm(input, self.weight, self.bias, self.eps)


class FusedBertIntermediate(BertIntermediate):
    """BERT intermediate as a bias-free matmul followed by the fused bias + exact GELU."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return dispatch.bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias)


def _is_exact_gelu(act: object) -> bool:
    """BERT's "gelu" (erf form); the tanh approximations must keep their own forward."""
    return type(act) is GELUActivation or act is F.gelu


_SWAPS: dict[type, type] = {nn.LayerNorm: FusedLayerNorm, BertIntermediate: FusedBertIntermediate}


def fuse_bert(model: nn.Module) -> nn.Module:
    """Patch ``model`` (BertModel / BertForMaskedLM / BertForSequenceClassification ...) in place.

    Only exact-type matches are swapped (a subclass may have a different forward); intermediates
    whose activation is not the exact GELU or whose dense layer has no bias are left alone.
    """
    for module in model.modules():
        if type(module) is nn.LayerNorm:
            module.__class__ = FusedLayerNorm
        elif (
            type(module) is BertIntermediate
            and _is_exact_gelu(module.intermediate_act_fn)
            and module.dense.bias is not None
        ):
            module.__class__ = FusedBertIntermediate
    return model


def unfuse_bert(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_bert` in place (e.g. before exporting with tools that match on classes)."""
    originals = {fused: original for original, fused in _SWAPS.items()}
    for module in model.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
    return model


def fused_mlm_loss(
    model: nn.Module,
    sequence_output: Tensor,
    labels: Tensor,
    reduction: Literal["mean", "sum"] = "mean",
    return_correct: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Masked-LM loss of a BertForMaskedLM / BertForPreTraining head without the [tokens, vocab] logits.

    Runs the head transform on the labelled positions only (a boolean gather: one host sync on
    GPU), then ``dispatch.linear_cross_entropy`` against the (tied) decoder.  Same value as
    ``model(..., labels=labels).loss``, except that no labelled position gives 0 instead of NaN.
    """
    head = model.cls.predictions
    hidden = sequence_output.reshape(-1, sequence_output.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    transformed = head.transform(hidden[keep])
    return dispatch.linear_cross_entropy(
        transformed,
        head.decoder.weight,
        head.decoder.bias,
        flat_labels[keep],
        reduction=reduction,
        return_correct=return_correct,
    )
