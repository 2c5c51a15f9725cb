"""The teacher-cache benchmark's pieces: the 32k pair, a short measured run, the tables."""

from __future__ import annotations

import pytest
from testing_utils import load_script

bench = load_script("benchmarks/bench_teacher_cache.py", "bench_teacher_cache")


def test_tiny32k_pair_has_a_32k_vocabulary_and_one_token_per_word():
    tokenizer = bench._tiny32k_tokenizer()
    assert len(tokenizer) == bench.TINY32K_VOCAB
    dataset = bench._tiny32k_dataset()
    ids = tokenizer(dataset[0]["text"])["input_ids"]
    assert len(ids) == bench.TINY32K_WORDS and tokenizer.unk_token_id not in ids


def test_cache_and_training_measurements_on_the_32k_pair(tmp_path, monkeypatch):
    # A smaller dataset keeps this to seconds; the measurement code is the benchmark's own.
    monkeypatch.setattr(bench, "TINY32K_ROWS", 8)
    size = bench.write_cache("tiny32k", str(tmp_path / "cache"), top_k=4)
    assert size["supervised_tokens"] == 8 * bench.TINY32K_WORDS  # every next word counts
    # 4 ids and log-probabilities plus the tail, and Arrow's offsets: just above 26 bytes.
    assert size["payload_bytes_per_token"] == 26
    assert 26 <= size["bytes_per_token"] < 40
    result = bench.measure_training("tiny32k", "cache", str(tmp_path / "cache"), 1, 1)
    assert result["step_s"] > 0 and result["peak_extra_mib"] > 0


def test_tables():
    rows = [
        {"pair": "demo", "mode": "live", "step_s": 0.2, "peak_extra_mib": 60.0, "top_k": 64},
        {"pair": "demo", "mode": "cache", "step_s": 0.1, "peak_extra_mib": 50.0, "top_k": 64,
         "bytes_per_token": 388.4, "cache_write_s": 12.0},
    ]  # fmt: skip
    table = bench.format_steps(rows)
    assert "| demo | cache, k = 64, bf16 | 0.100 | 50 | 388 | 12.0 |" in table
    summary = bench.summarise_rouge(
        [{"run": "live", "seed": 0, "rouge_l": 70.0}, {"run": "live", "seed": 1, "rouge_l": 72.0}]
    )
    assert summary[0]["rouge_l_mean"] == pytest.approx(71.0)
    assert summary[0]["rouge_l_std"] == pytest.approx(1.4142, rel=1e-3)
    assert "| live | 71.00 | 1.41 |" in bench.format_rouge(summary)
