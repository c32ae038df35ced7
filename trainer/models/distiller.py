"""What the engine trains in distillation: a student plus its loss terms, fed teacher outputs as tensors.

The teacher never lives inside these modules: it runs on the data side (online, under no_grad) or its
outputs come from the soft-label store, and arrive in the micro-batch. So DeepSpeed sees only the
student's parameters (ZeRO partitions and checkpoints the student alone), and the online and offline
modes train the same module. Every term is a sum over rows; the loop divides by the global count.

Rows carry a `weight` (1, or 0 for the filler example a rank runs when the last, partial global batch of
an epoch leaves it no example: every rank must run the same number of forward passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM, BertForSequenceClassification

from trainer.models.distillation import (
    HiddenProjection,
    cosine_loss_sum,
    kd_loss_sum,
    pkd_loss_sum,
    sparse_kd_loss_sum,
)
from trainer.models.losses import mlm_loss_sum
from trainer.models.mlm import register_head


def _mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    return None if bool(attention_mask.all()) else attention_mask  # unmasked SDPA takes the fast path


class ClassifierDistiller(nn.Module):
    """Turc et al. and Patient KD on sequence classification.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(gold, where gold >= 0)
           (regression, one output: alpha * (s - t)^2 + (1 - alpha) * (s - gold)^2 where gold is known)
           + beta * sum over mapped layers of |P(cls_s) / |P(cls_s)| - cls_t / |cls_t||^2

    P is the identity, or, for a student narrower than its teacher (``loss.projection``), one learned
    :class:`HiddenProjection` from the student's width to the teacher's, applied to the [CLS] state of every
    mapped layer. One P shared by all mapped layers, as TinyBERT's single W_h for its hidden-state term: it
    adds one H_s x H_t matrix whatever the depth, and a map common to all layers makes the student's layers
    themselves resemble the teacher's (up to one fixed linear change of basis), where a map per layer could
    absorb more of each layer's mismatch into its own projection. P belongs to this module, so the engine
    trains it with the student (optimizer, checkpoints, resume); the export writes ``hf`` alone, so P is
    dropped from the exported model (as MLMDistiller's projection is).
    """

    def __init__(
        self,
        hf: BertForSequenceClassification,
        temperature: float,
        alpha: float,
        beta: float = 0.0,
        student_layers: list[int] | None = None,
        projection: HiddenProjection | None = None,
    ):
        super().__init__()
        self.hf, self.t, self.alpha, self.beta = hf, temperature, alpha, beta
        self.student_layers = student_layers or []  # 1-based layers whose [CLS] meets the teacher's
        self.projection = projection  # student -> teacher width for the PKD term (None: equal widths)

    @property
    def regression(self) -> bool:
        """A one-output student scores (STS-B): the teacher's score is its soft label, squared error the term."""
        return self.hf.config.num_labels == 1

    def logits(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=_mask(attention_mask), token_type_ids=token_type_ids).logits

    def _regression(
        self, score: torch.Tensor, teacher: torch.Tensor, gold: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """alpha * sum (s - t)^2 + (1 - alpha) * sum over known gold scores (s - g)^2 (NaN gold: unknown). No
        temperature: a score has no distribution to soften."""
        kd = (score - teacher).square().mul(keep).sum()
        labeled = keep & ~torch.isnan(gold)
        mse = (score - torch.nan_to_num(gold)).square().mul(labeled).sum()
        return self.alpha * kd + (1 - self.alpha) * mse, {"kd": kd.detach(), "gold_mse": mse.detach()}

    def forward(self, input_ids, attention_mask, token_type_ids, weight, teacher_logits, gold, teacher_cls=None):
        want_hidden = self.beta > 0
        out = self.hf(
            input_ids=input_ids,
            attention_mask=_mask(attention_mask),
            token_type_ids=token_type_ids,
            output_hidden_states=want_hidden,
        )
        logits = out.logits.float()
        keep = weight > 0
        if self.regression:
            loss, stats = self._regression(logits[:, 0], teacher_logits[:, 0].float(), gold, keep)
        else:
            kd = kd_loss_sum(logits, teacher_logits.float(), self.t, mask=keep)
            labeled = keep & (gold >= 0)
            ce = F.cross_entropy(logits, gold.clamp(min=0), reduction="none").mul(labeled).sum()
            loss = self.alpha * kd + (1 - self.alpha) * ce
            predicted, answer = logits.detach().argmax(-1), teacher_logits.argmax(-1)
            stats = {
                "kd": kd.detach(),
                "ce": ce.detach(),
                "labeled": labeled.sum(),
                "correct": ((predicted == gold) & labeled).sum(),
                "agree": ((predicted == answer) & keep).sum(),
                # how often each class is the teacher's answer: trainer/health.py compares agreement with the
                # majority's
                **{f"teacher_class/{c}": ((answer == c) & keep).sum() for c in range(logits.shape[-1])},
            }
        stats.update(examples=weight.sum(), tokens=(attention_mask * weight[:, None].long()).sum())
        if want_hidden:
            student_cls = [out.hidden_states[i][:, 0] for i in self.student_layers]
            if self.projection is not None and student_cls:  # one call for all mapped layers: [B, M, H_t]
                student_cls = list(self.projection(torch.stack(student_cls, dim=1)).unbind(1))
            student_cls = [s * weight[:, None] for s in student_cls]  # after P: a filler row is zero, bias or not
            teacher = [teacher_cls[:, j] * weight[:, None] for j in range(teacher_cls.shape[1])]
            pkd = pkd_loss_sum(student_cls, teacher) if self.student_layers else logits.new_zeros(())
            loss = loss + self.beta * pkd
            stats["pkd"] = pkd.detach()
        return loss, stats


class MLMDistiller(nn.Module):
    """DistilBERT's triple loss on masked-LM inputs.

    loss = a_ce * T^2 * KL over the vocabulary at the KD positions + a_mlm * MLM CE at the masked positions
           + a_cos * (1 - cos(student, teacher last hidden)) at non-pad positions.
    The teacher's distribution is dense logits at the KD positions (online) or its stored top-k
    (offline; sparse KL renormalised over the k entries). Student logits exist only at those positions.
    """

    def __init__(
        self,
        hf: BertForMaskedLM,
        temperature: float,
        a_ce: float,
        a_mlm: float,
        a_cos: float,
        projection: HiddenProjection | None = None,
    ):
        super().__init__()
        self.hf, self.t, self.a_ce, self.a_mlm, self.a_cos = hf, temperature, a_ce, a_mlm, a_cos
        self.projection = projection
        register_head(self, hf)

    def _vocab_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        p = self.hf.cls.predictions
        return F.linear(p.transform(hidden_rows), p.decoder.weight, p.bias).float()

    def forward(
        self,
        input_ids,
        attention_mask,
        weight=None,
        kd_positions=None,
        mlm_positions=None,
        mlm_labels=None,
        teacher_logits=None,
        topk_ids=None,
        topk_logprobs=None,
        teacher_hidden=None,
    ):
        hidden = self.hf.bert(input_ids=input_ids, attention_mask=_mask(attention_mask)).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        if weight is None:  # evaluation (trainer.stages.evaluate_mlm): plain masked-token loss and hits
            p = self.hf.cls.predictions
            mlm, correct = mlm_loss_sum(
                p.transform(flat.index_select(0, mlm_positions)), p.decoder.weight, p.bias, mlm_labels
            )
            return mlm, {"correct": correct, "count": torch.tensor(mlm_labels.numel()), "tokens": attention_mask.sum()}
        student = self._vocab_logits(flat.index_select(0, kd_positions))
        keep = weight.repeat_interleave(attention_mask.shape[1])  # per flattened position
        kd_keep = keep.index_select(0, kd_positions) > 0
        if teacher_logits is not None:
            kd = kd_loss_sum(student, teacher_logits.float(), self.t, mask=kd_keep)
        else:
            kd = sparse_kd_loss_sum(student, topk_ids, topk_logprobs.float(), self.t, mask=kd_keep)
        loss = self.a_ce * kd
        stats = {
            "examples": weight.sum(),
            "kd": kd.detach(),
            "kd_positions": kd_keep.sum(),
            "tokens": (attention_mask * weight[:, None].long()).sum(),
        }
        if self.a_mlm > 0:
            p = self.hf.cls.predictions
            picked = p.transform(flat.index_select(0, mlm_positions))
            mlm_keep = keep.index_select(0, mlm_positions) > 0
            labels = torch.where(mlm_keep, mlm_labels, torch.full_like(mlm_labels, -100))
            mlm, correct = mlm_loss_sum(picked, p.decoder.weight, p.bias, labels)
            loss = loss + self.a_mlm * mlm
            stats.update(mlm=mlm.detach(), correct=correct, masked=mlm_keep.sum())
        if self.a_cos > 0:
            s = self.projection(hidden) if self.projection is not None else hidden
            cos = cosine_loss_sum(s, teacher_hidden, attention_mask * weight[:, None].long())
            loss = loss + self.a_cos * cos
            stats["cos"] = cos.detach()
        return loss, stats
