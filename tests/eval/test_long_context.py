from __future__ import annotations

import pytest
import torch

from arwkv.eval.loglik import score_tokens
from arwkv.eval.long_context import FILLER, passkey, passkey_prompt, plot, smooth

from .tiny import tiny_llama


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth(qwen_tokenizer, depth):
    tok = qwen_tokenizer
    p = passkey_prompt(tok, 1000, depth, "48213")
    filler_len = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    assert 1000 - filler_len < len(p.tokens) <= 1000
    assert tok.decode(p.tokens[p.needle_start :]).startswith("The pass key is 48213. Remember it.")
    assert abs(p.needle_start / len(p.tokens) - depth) <= 1.5 * filler_len / len(p.tokens)
    assert tok.decode(p.tokens).endswith("What is the pass key? The pass key is")
    assert tok.decode(p.answer) == " 48213"


def test_exact_match_is_greedy_generation(qwen_tokenizer):
    tok = qwen_tokenizer
    model = tiny_llama(vocab_size=len(tok))
    p = passkey_prompt(tok, 120, 0.5, "11111")
    ids = torch.tensor([p.tokens])
    gen = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0
    )[0, len(p.tokens) :].tolist()
    wrong = gen[:2] + [(gen[2] + 1) % len(tok)]
    hit, miss = score_tokens(model, [(p.tokens, gen), (p.tokens, wrong)], progress=False)
    assert hit.is_greedy and not miss.is_greedy


def test_passkey_grid_and_plot(qwen_tokenizer, tmp_path):
    model = tiny_llama(vocab_size=len(qwen_tokenizer))
    res = passkey(model, qwen_tokenizer, lengths=(100, 200), depths=(0.0, 1.0), trials=1, progress=False)
    assert [(r.target_length, r.depth) for r in res] == [(100, 0.0), (100, 1.0), (200, 0.0), (200, 1.0)]
    assert all(r.logprob < 0 and len(r.key) == 5 for r in res)
    xs, ys = smooth([float(i) for i in range(100)], bins=10)
    assert xs == sorted(xs) and ys == sorted(ys)
    out = plot(
        {"tiny": {"passkey": [r.__dict__ for r in res], "loss_by_position": [1.0] * 64}}, tmp_path / "lc.png"
    )
    assert out.stat().st_size > 1000
