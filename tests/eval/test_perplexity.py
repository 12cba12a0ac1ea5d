from __future__ import annotations

import math

import torch

from arwkv.eval.perplexity import teacher_student_kl, text_perplexity, windows

from .tiny import tiny_llama


def test_windows_predict_every_token_once():
    tokens = list(range(10, 33))  # 23 tokens
    for L, stride in [(8, 8), (8, 3), (30, 30)]:
        ws = windows(tokens, 1, L, stride)
        targets = [t for w in ws for t in w.targets]
        assert targets == tokens
        for w in ws:
            assert len(w.inputs) <= L
            # the logit at inputs[first + k] predicts targets[k]: the input right before it in the stream
            seq = [1, *tokens]
            for k, t in enumerate(w.targets):
                assert seq[seq.index(t) - 1] == w.inputs[w.first + k]


class Unigram(torch.nn.Module):
    """Ignores context: p(token) is a fixed distribution, so perplexity has a closed form."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        return type("Out", (), {"logits": self.logits.expand(B, T, -1)})()


class Tok:
    bos_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(c) for c in text]}

    def decode(self, ids):
        return "".join(str(i) for i in ids)


def test_perplexity_closed_form():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    text = "1233" * 10
    r = text_perplexity(Unigram(logits), Tok(), text, context_length=7, batch_size=3, progress=False)
    expected_nll = -10 * (math.log(0.2) + math.log(0.3) + 2 * math.log(0.4))
    assert r.n_tokens == 40 and r.n_bytes == 40
    assert math.isclose(r.nll_sum, expected_nll, rel_tol=1e-6)
    assert math.isclose(r.perplexity, math.exp(expected_nll / 40), rel_tol=1e-6)
    assert math.isclose(r.bits_per_byte, expected_nll / 40 / math.log(2), rel_tol=1e-6)
    assert sum(r.per_position_count) == 40


def test_kl_zero_for_identical_models_and_positive_otherwise(qwen_tokenizer):
    t = tiny_llama(vocab_size=len(qwen_tokenizer), seed=0)
    s = tiny_llama(vocab_size=len(qwen_tokenizer), seed=1)
    text = "The quick brown fox jumps over the lazy dog. " * 8
    same = teacher_student_kl(t, t, qwen_tokenizer, text, context_length=32, progress=False)
    assert abs(same.kl) < 1e-5 and same.top1_agreement == 1.0
    diff = teacher_student_kl(t, s, qwen_tokenizer, text, context_length=32, progress=False)
    assert diff.kl > 1e-3 and diff.n_tokens == same.n_tokens


def test_kl_matches_manual_sum():
    logits_t = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    logits_s = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    r = teacher_student_kl(
        Unigram(logits_t), Unigram(logits_s), Tok(), "1230" * 5, context_length=6, progress=False
    )
    kl = sum(p * math.log(p / 0.25) for p in [0.7, 0.1, 0.1, 0.1])
    assert math.isclose(r.kl, kl, rel_tol=1e-5)
    assert r.confident_fraction == 1.0 and r.top1_agreement == 1.0  # argmax ties go to index 0 in both
