"""`wellread latency`: the JSON a study report reads, its parameter count, and a bad model as a one-line error.

No timing is compared with another (a shared 2-core machine makes "faster than" flaky); the values are only
checked to be positive and finite.
"""

from __future__ import annotations

import json
import math

from trainer.cli import main as cli

TINY = ("--model", "bert-L2-H128", "--repeats", "2", "--warmup", "1", "--seq-len", "16", "--threads", "1")


def test_latency_writes_the_report_json(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path / "deep" / "latency.json"
    assert cli(["latency", *TINY, "--batch-sizes", "1", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"model", "params", "seq_len", "threads", "torch", "cpu", "batches"}
    assert result["model"] == "bert-L2-H128" and result["seq_len"] == 16 and result["threads"] == 1
    assert isinstance(result["cpu"], str) and result["torch"]
    # built independently: BERT-Tiny's published shape (Turc et al.), BERT's vocabulary, a 2-class head
    cfg = BertConfig(
        vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    cfg.num_labels = 2
    assert result["params"] == sum(p.numel() for p in BertForSequenceClassification(cfg).parameters())
    assert set(result["batches"]) == {"1", "4"}
    for batch, row in result["batches"].items():
        assert set(row) == {"ms_per_batch", "ms_per_batch_p90", "ms_per_example"}, batch
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in row.values()), row
        assert row["ms_per_example"] == row["ms_per_batch"] / int(batch)
        assert row["ms_per_batch_p90"] >= row["ms_per_batch"]
    assert not list(out.parent.glob(".*tmp")), "temporary file left behind"


def test_a_bad_model_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert cli(["latency", "--model", str(tmp_path / "no-such-model"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wellread: error: ") and "no-such-model" in err and "\n" not in err, err
    assert not out.exists()
    assert cli(["latency", *TINY, "--batch-sizes", "0", "--out", str(out)]) == 2
    assert "--batch-sizes" in capsys.readouterr().err and not out.exists()
