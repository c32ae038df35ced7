from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from transformers import AutoModel, BertForPreTraining, BertModel

from trainer.errors import UserError
from trainer.models.zoo import ALIASES, PRESETS, PUBLISHED_MILLIONS, bert_config, parameter_counts, resolve


def test_grid_has_all_24_students_and_teachers():
    students = [n for n in PRESETS if n.startswith("bert-L")]
    assert len(students) == 24
    for layers in (2, 4, 6, 8, 10, 12):
        for hidden in (128, 256, 512, 768):
            cfg = bert_config(f"bert-L{layers}-H{hidden}")
            assert (cfg.num_hidden_layers, cfg.hidden_size) == (layers, hidden)
            assert cfg.num_attention_heads == hidden // 64 and cfg.intermediate_size == 4 * hidden
    large = bert_config("bert-large")
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)


@pytest.mark.parametrize("alias", sorted(PUBLISHED_MILLIONS))
def test_counts_match_published_and_real_modules(alias):
    cfg = bert_config(alias)
    counts = parameter_counts(cfg)
    assert round(counts["published"] / 1e6, 1) == PUBLISHED_MILLIONS[alias]
    with torch.device("meta"):
        encoder = BertModel(cfg)
        full = BertForPreTraining(cfg)
    assert counts["encoder"] == sum(p.numel() for p in encoder.parameters())
    assert counts["published"] == sum(p.numel() for p in full.parameters())


def test_aliases_resolve():
    assert resolve("tiny") == PRESETS["bert-L2-H128"]
    assert set(ALIASES) == {"tiny", "mini", "small", "medium", "base"}
    with pytest.raises(UserError, match="unknown model 'bert-L3-H100'"):
        resolve("bert-L3-H100")


def test_local_hf_directory_is_a_model_spec(minilm_dir):
    assert resolve(str(minilm_dir)) == minilm_dir
    cfg = bert_config(str(minilm_dir))
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (6, 384)


def test_models_command_prints_grid():
    proc = run_cli("models", check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 + 26
    tiny = next(line for line in lines if line.startswith("bert-L2-H128"))
    assert "tiny" in tiny and "4.4M" in tiny


def test_our_kernels_package_is_not_mistaken_for_hf_kernels(minilm_dir):
    """transformers probes a top-level `kernels` package (HF hub kernels); ours must not pass for it."""
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).parent == ROOT / "kernels"
    import kernels

    assert not hasattr(kernels, "__version__")
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False
    model = AutoModel.from_pretrained(minilm_dir)
    out = model(input_ids=torch.tensor([[101, 7592, 102]]))
    assert out.last_hidden_state.shape == (1, 3, 384)
