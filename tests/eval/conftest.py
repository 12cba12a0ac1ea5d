"""Real tokenizers and tiny random teachers for the eval tests (CPU, one thread)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from .tiny import tiny_llama


@pytest.fixture
def qwen_tokenizer(shared):
    return AutoTokenizer.from_pretrained(shared / "assets" / "qwen2-tokenizer")


@pytest.fixture
def qwen_tiny(qwen_tokenizer):
    """A tiny random Llama over the real Qwen2 vocabulary (151k rows × 32 dims)."""
    return tiny_llama(vocab_size=len(qwen_tokenizer))
