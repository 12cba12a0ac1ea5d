from __future__ import annotations

import math

import torch

from arwkv.eval.loglik import encode_pair, loglikelihood, prefix_token_id, score_tokens

from .tiny import tiny_llama

REQUESTS = [
    ("The capital of France is", " Paris"),
    ("Question: What is 2+2?\nAnswer:", " 4"),
    ("She opened the door and saw ", "a tall man standing in the rain."),  # trailing space moves over
    ("", "A whole sentence scored after the prefix token."),
    ("One", " two three four five six seven eight nine ten eleven twelve"),
    ("x", " y"),
    ("Long context " * 12, "end"),
    ("Mixed lengths matter", " for padding."),
    ("Tiny", "."),
]


def manual(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unpadded forward on context + continuation; sum the continuation's log-probs by hand."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    total, greedy = 0.0, True
    for j, tok in enumerate(cont):
        row = logp[len(ctx) + j - 1]
        total += row[tok].item()
        greedy &= int(row.argmax()) == tok
    return total, greedy


def test_encode_pair_follows_harness(qwen_tokenizer):
    tok = qwen_tokenizer
    ctx, cont = encode_pair(tok, "I saw a ", "cat")
    # the context's trailing space joins the continuation, as in lm-eval's _encode_pair
    assert ctx == tok("I saw a", add_special_tokens=False)["input_ids"]
    assert cont == tok(" cat", add_special_tokens=False)["input_ids"]
    ctx, cont = encode_pair(tok, "", "Hello world")
    assert ctx == [prefix_token_id(tok)]
    assert tok.decode(cont) == "Hello world"
    # whole-string encoding: continuation = tokens of the joint string past the context's tokens
    ctx, cont = encode_pair(tok, "Answer:", " 42")
    whole = tok("Answer: 42", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole


def test_loglik_equals_manual_forward(qwen_tokenizer, qwen_tiny):
    results = loglikelihood(qwen_tiny, qwen_tokenizer, REQUESTS, batch_size=4, progress=False)
    for (c, x), r in zip(REQUESTS, results, strict=True):
        ctx, cont = encode_pair(qwen_tokenizer, c, x)
        lp, greedy = manual(qwen_tiny, ctx, cont)
        assert r.n_tokens == len(cont)
        assert math.isclose(r.logprob, lp, rel_tol=1e-5, abs_tol=1e-4)
        assert r.is_greedy == greedy
    assert all(r.logprob < 0 for r in results)


def test_batch_size_does_not_change_scores(qwen_tokenizer, qwen_tiny):
    one = loglikelihood(qwen_tiny, qwen_tokenizer, REQUESTS, batch_size=1, progress=False)
    eight = loglikelihood(qwen_tiny, qwen_tokenizer, REQUESTS, batch_size=8, progress=False)
    for a, b in zip(one, eight, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4
        assert a.is_greedy == b.is_greedy


def test_greedy_flag_on_a_memorised_continuation():
    # A model whose output layer copies the input token's embedding predicts "repeat the last token".
    model = tiny_llama(vocab_size=64)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in layer.parameters():
                p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    r_same, r_diff = score_tokens(model, [([5, 7], [7, 7]), ([5, 7], [8])], progress=False)
    assert r_same.is_greedy and not r_diff.is_greedy
    assert r_same.logprob / 2 > r_diff.logprob  # per token: the repeated token is likelier


def test_left_truncation_keeps_the_continuation():
    model = tiny_llama(vocab_size=64)
    ctx, cont = list(range(1, 40)), [3, 4, 5]
    (r,) = score_tokens(model, [(ctx, cont)], max_length=10, progress=False)
    # lm-eval feeds the last max_length+1 tokens minus the final one
    lp, _ = manual(model, ctx[-(10 + 1 - len(cont)) :], cont)
    assert math.isclose(r.logprob, lp, rel_tol=1e-5)
