"""The frozen teacher: one loader and one forward for `wellread label` (soft labels into a store) and
`wellread distill` (the online teacher), so both see the same model from the same directory.

A teacher is a trained Hugging Face directory (config.json + model.safetensors; a wellread export or
run): `BertForSequenceClassification` for classification, `BertForMaskedLM` for MLM, with every weight
saved (a plain encoder such as MiniLM, whose head would be random, is refused before any other work).
It is loaded in float32 (an fp16 export too), frozen, in eval mode, on the device, and runs under no_grad; below fp32
(a bf16/fp16 engine on a GPU) under autocast in that precision, so a bf16 student does not wait for an fp32 teacher.
On CPU it stays fp32, as the store's labels are. Each caller takes the view it needs of one forward:

    classify(batch, cls_layers)  logits [B, C] and the [CLS] states after chosen layers [B, L, H]
    mlm(batch, hidden)           vocabulary logits [B, T, V] and the last hidden states [B, T, H]
    topk(batch, k)               the k most likely tokens per position and their log-probabilities

All returned on the CPU in float32 (topk's ids int64).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from trainer.data.tasks import resolve_task
from trainer.data.tokenization import load_tokenizer
from trainer.errors import UserError
from trainer.fileio import sha256_file
from trainer.models.zoo import resolve

WEIGHTS = "model.safetensors"
MODEL_CLASSES = {"classification": "BertForSequenceClassification", "mlm": "BertForMaskedLM"}  # per store kind
HOW_TO_TRAIN = {  # what to run when a teacher's head would be newly initialised
    "classification": "fine-tune it first: wellread finetune RECIPE.yaml model.name={dir} (then give the run's best/)",
    "mlm": "pre-train an MLM head first: wellread pretrain RECIPE.yaml model.name={dir} (then give the run's export/)",
}


class UntrainedTeacher(UserError):
    """The teacher directory lacks weights its model class needs: they would be random, and so its soft labels."""


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def teacher_precision(dtype: torch.dtype):
    """Autocast in the engine's precision on a GPU (a bf16 student beside an fp32 teacher spent most of the
    step in the teacher); on CPU, or at fp32, the teacher runs as saved."""
    if dtype == torch.float32 or not torch.cuda.is_available():
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def teacher_dir(name: str, what: str) -> Path:
    """The trained model directory `name` resolves to; a preset (random weights) or a directory without
    model.safetensors is refused, naming `what` (the recipe key)."""
    spec = resolve(name)
    if not isinstance(spec, Path):
        raise UserError(f"{what}: '{name}' is a preset (random weights); give a trained model directory")
    if not (spec / WEIGHTS).is_file():
        raise UserError(
            f"{what}: {spec} has no {WEIGHTS}; the teacher must be an exported model directory "
            f"(config.json + {WEIGHTS})"
        )
    return spec


def teacher_fingerprint(model_dir: Path) -> dict[str, str]:
    """What a store records of its teacher: config (without the transformers version) and weights sha256."""
    weights = model_dir / WEIGHTS
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("transformers_version", None)
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": sha256_file(weights),
        "path": str(model_dir),
    }


def model_inputs(model_dir: Path) -> str | None:
    """ "pair" or "single": what a wellread export was trained on (its wellread.json `inputs`, or for exports made
    before that was recorded, its fine-tuning task's arity); None for a model wellread did not train."""
    record = model_dir / "wellread.json"
    if not record.is_file():
        return None
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if info.get("inputs") in ("pair", "single"):
        return info["inputs"]
    try:
        return "pair" if resolve_task(info["task"]).text_b is not None else "single"
    except (KeyError, TypeError, UserError):
        return None


def load_trained(model_dir: Path, kind: str) -> transformers.PreTrainedModel:
    """The teacher model of `kind` from `model_dir`; refused when any of its weights would be newly initialised.

    The check reads transformers' own load report (`output_loading_info=True`) rather than comparing key names
    in the safetensors file: the library knows which weights are tied (the MLM decoder), which checkpoint names
    it renames or adds a prefix to, and which buffers are not saved, so "missing" means exactly "random here".
    The report's table and the progress bar are silenced: the one-line error says what matters."""
    cls = getattr(transformers, MODEL_CLASSES[kind])
    verbosity, bar = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(model_dir, output_loading_info=True, dtype=torch.float32)  # fp16 exports too
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.logging.enable_progress_bar()
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UntrainedTeacher(
            f"{model_dir} is not a trained {kind} teacher: {len(missing)} weights of {cls.__name__} are not in "
            f"its {WEIGHTS} and would be random ({shown}); {HOW_TO_TRAIN[kind].format(dir=model_dir)}"
        )
    return model


class Teacher:
    """A frozen teacher of one kind ("classification" or "mlm") on `device`, run under no_grad."""

    def __init__(
        self, model_dir: Path, kind: str, device: torch.device | None = None, precision: torch.dtype = torch.float32
    ):
        if kind not in MODEL_CLASSES:
            raise ValueError(f"teacher kind must be one of {list(MODEL_CLASSES)}, got {kind!r}")
        self.directory, self.kind = Path(model_dir), kind
        self.device = device if device is not None else default_device()
        self.precision = precision
        self.model = load_trained(self.directory, kind).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = self.model.config

    @property
    def num_classes(self) -> int:
        return self.config.num_labels

    @property
    def class_names(self) -> list[str] | None:
        """Its classes' names in id order (a wellread fine-tune's task names); None for LABEL_0, LABEL_1 ..."""
        names = [self.config.id2label[i] for i in range(self.num_classes)]
        return None if names == [f"LABEL_{i}" for i in range(self.num_classes)] else names

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def depth(self) -> int:
        return self.config.num_hidden_layers

    @property
    def inputs(self) -> str | None:
        """What the teacher was trained on: "pair" or "single" texts, else None (unknown: no wellread record)."""
        return model_inputs(self.directory)

    def fingerprint(self) -> dict[str, str]:
        return teacher_fingerprint(self.directory)

    def weights_sha256(self) -> str:
        return sha256_file(self.directory / WEIGHTS)

    def tokenizer(self):
        """The tokenizer saved with the teacher (`tokenizers.Tokenizer`)."""
        return load_tokenizer(self.directory)

    # -- the forward and its views
    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], hidden_states: bool = False):
        """The model's output for `batch` (its tensors moved to the device), under no_grad and the precision."""
        inputs = {name: value.to(self.device) for name, value in batch.items()}
        with teacher_precision(self.precision):
            return self.model(**inputs, output_hidden_states=hidden_states)

    @torch.no_grad()
    def classify(
        self, batch: dict[str, torch.Tensor], cls_layers: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, C], and with `cls_layers` (1-based) the [CLS] vector after each of them [B, L, H]."""
        out = self.forward(batch, hidden_states=bool(cls_layers))
        logits = out.logits.float().cpu()
        if not cls_layers:
            return logits, None
        return logits, torch.stack([out.hidden_states[t][:, 0] for t in cls_layers], dim=1).float().cpu()

    @torch.no_grad()
    def mlm(self, batch: dict[str, torch.Tensor], hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vocabulary logits [B, T, V], and with `hidden` the last layer's hidden states [B, T, H] (DistilBERT's
        cosine term)."""
        out = self.forward(batch, hidden_states=hidden)
        logits = out.logits.float().cpu()
        return logits, out.hidden_states[-1].float().cpu() if hidden else None

    @torch.no_grad()
    def topk(self, batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely tokens per position [B, T, k] and their log-probabilities under the full softmax."""
        logits = self.forward(batch).logits.float()
        values, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        return ids.cpu(), values.cpu()
