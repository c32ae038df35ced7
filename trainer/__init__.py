"""wellread: pre-trained distillation of compact BERT models (Turc et al. 2019, DistilBERT, Patient KD)."""

__all__ = ["UserError"]

from trainer.errors import UserError  # noqa: E402
