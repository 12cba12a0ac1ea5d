"""Held-out metrics: closed forms against the teacher itself, the teacher cache, the SWA baseline."""

from __future__ import annotations

import pytest
import torch
from toys import real_pair

from arwkv.train.metrics import heldout_metrics, iter_batches


def _held(n=6, t=20):
    ids = torch.randint(3, 100, (n, t), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def test_teacher_against_itself():
    teacher, _ = real_pair()
    m = heldout_metrics(teacher, teacher, iter_batches(_held(), 4))
    assert m["kl"] == pytest.approx(0, abs=1e-6) and m["nll_ratio"] == pytest.approx(1, abs=1e-6)
    assert m["top1"] == 1.0 and m["tokens"] == 6 * 19 - 5


def test_nll_is_the_mean_negative_log_likelihood():
    teacher, student = real_pair()
    held = _held()
    m = heldout_metrics(student, teacher, iter_batches(held, 3))
    logp = torch.log_softmax(student(held["input_ids"]).logits.double(), -1)
    nll, n = 0.0, 0
    for b in range(6):
        for t in range(19):
            if held["attention_mask"][b, t + 1]:
                nll -= logp[b, t, held["input_ids"][b, t + 1]].item()
                n += 1
    assert m["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert m["kl"] > 0 and 0 <= m["top1"] <= 1


def test_teacher_cache_gives_identical_metrics():
    teacher, student = real_pair()
    cache: dict = {}
    a = heldout_metrics(student, teacher, iter_batches(_held(), 4), teacher_cache=cache)
    assert len(cache) == 2
    b = heldout_metrics(student, teacher, iter_batches(_held(), 4), teacher_cache=cache)
    c = heldout_metrics(student, teacher, iter_batches(_held(), 4))
    assert a == b == c


def test_sliding_window_baseline_is_exact_inside_the_window():
    from arwkv.eval.baselines import SinkWindowBaseline

    teacher, _ = real_pair()
    short = heldout_metrics(
        SinkWindowBaseline(teacher, window=64, sinks=4), teacher, iter_batches(_held(), 4)
    )
    assert short["kl"] == pytest.approx(0, abs=1e-5)  # 20 tokens < window: the baseline is the teacher
    narrow = heldout_metrics(
        SinkWindowBaseline(teacher, window=2, sinks=1), teacher, iter_batches(_held(), 4)
    )
    assert narrow["kl"] > 1e-4


def test_heldout_kl_is_the_one_kl():
    """The held-out KL is arwkv.ops.divergence's KL (the one training and `arwkv eval` use), averaged over the
    counted positions."""
    from arwkv.ops.divergence import kl_per_token

    teacher, student = real_pair()
    held = _held()
    m = heldout_metrics(student, teacher, iter_batches(held, 4))
    with torch.no_grad():
        kl = kl_per_token(
            student(held["input_ids"]).logits[:, :-1], teacher(held["input_ids"]).logits[:, :-1]
        )
    counted = held["attention_mask"][:, 1:].bool()
    assert m["kl"] == pytest.approx(kl[counted].mean().item(), rel=1e-5)
