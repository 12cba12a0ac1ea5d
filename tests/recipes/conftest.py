"""Fixtures shared by the recipe tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def qwen_tok_teacher(shared, tmp_path) -> Path:
    """A tiny random Llama saved with the real Qwen2 tokenizer (which has a chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(shared / "assets/qwen2-tokenizer")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,  # room for the demo's passkey lengths
    )
    folder = tmp_path / "teacher"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


#: a stories260K conversion shrunk to seconds (one process, 2 steps per stage, no SWA baseline)
TINY_STAGES = [
    "processes=1",
    "threads=1",
    "data.data_free.num_sequences=16",
    "data.data_free.seq_len=32",
    "data.data_free.batch_size=16",
    "data.heldout.num_sequences=4",
    "data.heldout.seq_len=32",
    "data.heldout.batch_size=4",
    "align.seq_len=32",
    "align.batch_size=4",
    "align.max_steps=2",
    "align.warmup_steps=1",
    "distill.seq_len=32",
    "distill.batch_size=4",
    "distill.max_steps=2",
    "distill.warmup_steps=1",
    "eval.swa_baseline=false",
]


@pytest.fixture
def tiny_stages() -> list[str]:
    """Recipe overrides that shrink a conversion to a couple of steps per stage."""
    return list(TINY_STAGES)
