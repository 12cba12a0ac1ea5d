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
