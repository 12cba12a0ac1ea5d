"""BLiMP is scored as lm-eval scores it: each sentence is a choice behind the default target_delimiter " ",
after an empty context, so a request is ("", " " + sentence) and the empty context becomes the prefix token
(lm_eval/tasks/blimp/_template_yaml; ConfigurableTask.construct_requests; TemplateLM.loglikelihood)."""

from __future__ import annotations

import math

import torch

from arwkv.eval.harness import evaluate
from arwkv.eval.loglik import encode_pair, loglikelihood
from arwkv.eval.tasks import get_task

PAIR = {"sentence_good": "Susan revealed herself.", "sentence_bad": "Susan revealed themselves."}


def test_requests_carry_the_delimiter_space() -> None:
    task = get_task("blimp")
    assert task.requests(PAIR) == [("", " Susan revealed herself."), ("", " Susan revealed themselves.")]


def test_real_item_request_strings(shared) -> None:
    task = get_task("blimp")
    doc = task.load(shared / "eval")[0]  # anaphor_number_agreement, pair 0
    assert doc["paradigm"] == "anaphor_number_agreement"
    assert task.requests(doc) == [("", " Susan revealed herself."), ("", " Susan revealed themselves.")]


def test_tokens_are_the_prefix_then_the_spaced_sentence(qwen_tokenizer) -> None:
    tok = qwen_tokenizer
    ctx, cont = encode_pair(tok, *get_task("blimp").requests(PAIR)[0])
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert ctx == [prefix]
    assert cont == tok.encode(" Susan revealed herself.", add_special_tokens=False)
    # the space is part of the first token; without it the sentence tokenizes differently
    assert tok.decode(cont[:1]) == " Susan"
    assert cont != tok.encode("Susan revealed herself.", add_special_tokens=False)


def _by_hand(model, tok, sentence: str) -> float:
    """lm-eval's convention written out: [prefix] + tokens(" " + sentence), sum of log p(token | earlier)."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    cont = tok.encode(" " + sentence, add_special_tokens=False)
    ids = torch.tensor([[prefix, *cont]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(logp[j, t].item() for j, t in enumerate(cont))


def test_loglik_and_acc_equal_a_hand_computation(shared, qwen_tokenizer, qwen_tiny) -> None:
    task = get_task("blimp")
    docs = task.load(shared / "eval")[:4]  # one pair of each paradigm
    reqs = [r for d in docs for r in task.requests(d)]
    ours = loglikelihood(qwen_tiny, qwen_tokenizer, reqs, batch_size=3, progress=False)
    sentences = [s for d in docs for s in (d["sentence_good"], d["sentence_bad"])]
    hand = [_by_hand(qwen_tiny, qwen_tokenizer, s) for s in sentences]
    for r, h in zip(ours, hand, strict=True):
        assert math.isclose(r.logprob, h, rel_tol=1e-5, abs_tol=1e-4)
    # the test can tell the conventions apart: the old request (no space) scores differently
    (old,) = loglikelihood(qwen_tiny, qwen_tokenizer, [("", docs[0]["sentence_good"])], progress=False)
    assert abs(old.logprob - hand[0]) > 1e-2
    # through the harness: acc = mean of [ll(good) >= ll(bad)] (lm-eval's argmax; a tie counts as correct)
    models = {"t": (qwen_tiny, qwen_tokenizer)}
    out = evaluate(models, ["blimp"], limit=4, data_dir=shared / "eval", progress=False)
    want = sum(hand[2 * i] >= hand[2 * i + 1] for i in range(4)) / 4
    assert out["results"]["t"]["blimp"]["acc"]["value"] == want
