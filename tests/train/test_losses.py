"""Losses against closed forms: chunked == unchunked, temperature, masking, vocab reconciliation, one
shift."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arwkv.ops.divergence import kl_per_token
from arwkv.train.losses import (
    ce_loss_from_hidden,
    kl_loss,
    kl_loss_from_hidden,
    masked_ce,
    output_match_loss,
    shift_labels,
)


def _kl_ref(zs, zt, T=1.0):
    """Textbook T²·Σ p_T (log p_T − log p_S), float64."""
    pt = torch.softmax(zt.double() / T, -1)
    return (pt * (pt.log() - torch.log_softmax(zs.double() / T, -1))).sum(-1) * T * T


def test_kl_matches_torch_kl_div():
    zs, zt = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    total, count = kl_loss(zs, zt)
    ref = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="sum")
    assert count == 10
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_kl_chunked_equals_unchunked_values_and_grads(chunk):
    zs = torch.randn(3, 7, 13, requires_grad=True)
    zt = torch.randn(3, 7, 13)
    mask = torch.rand(3, 7) > 0.3
    total, count = kl_loss(zs, zt, mask, chunk_size=chunk)
    (g,) = torch.autograd.grad(total, zs)
    ref = (_kl_ref(zs, zt) * mask).sum()
    (g_ref,) = torch.autograd.grad(ref, zs)
    assert count == mask.sum()
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_kl_temperature_closed_form(T):
    zs, zt = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(kl_per_token(zs, zt, T).double(), _kl_ref(zs, zt, T), rtol=1e-5, atol=1e-6)


def test_kl_two_point_closed_form():
    # p_T = (1/2, 1/2), p_S = (e/(1+e), 1/(1+e)): KL = log 2 ... computed by hand
    zt, zs = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    ps = torch.tensor([math.e / (1 + math.e), 1 / (1 + math.e)])
    expected = 0.5 * math.log(0.5 / ps[0]) + 0.5 * math.log(0.5 / ps[1])
    assert kl_per_token(zs, zt).item() == pytest.approx(expected, rel=1e-6)
    assert kl_per_token(zt, zt).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_masking_ignores_masked_positions():
    zs, zt = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    a, n = kl_loss(zs, zt, mask)
    zs2 = zs.clone()
    zs2[mask == 0] = 1e4  # garbage at padding must not matter
    b, _ = kl_loss(zs2, zt, mask)
    assert n == 8 and torch.equal(a, b)


def test_kl_vocab_reconciled_by_truncation():
    zs, zt = torch.randn(2, 3, 8), torch.randn(2, 3, 10)  # teacher has a padded, larger vocabulary
    total, _ = kl_loss(zs, zt)
    ref = _kl_ref(zs, zt[..., :8]).sum()
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-6)
    total2, _ = kl_loss(zt, zs)  # and the other way round
    torch.testing.assert_close(total2.double(), _kl_ref(zt[..., :8], zs).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_kl_from_hidden_equals_kl_on_logits(ce_weight):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 17, bias=False)
    h = torch.randn(2, 5, 6, requires_grad=True)
    zt = torch.randn(2, 5, 19)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    labels = torch.randint(0, 17, (2, 5)).masked_fill(~mask, -100)
    flat_t = zt.reshape(-1, 19)
    total, count, parts = kl_loss_from_hidden(
        h, head, lambda j: flat_t[j], mask, temperature=2.0, chunk_size=3, labels=labels, ce_weight=ce_weight
    )
    logits = head(h)
    ref_kl, ref_n = kl_loss(logits, zt, mask, temperature=2.0)
    ref_ce = F.cross_entropy(logits.reshape(-1, 17), labels.reshape(-1), reduction="sum")
    ref = ref_kl + ce_weight * ref_ce
    assert count == ref_n == 8
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["kl"], ref_kl.detach(), rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(total, [h, head.weight])
    g_ref = torch.autograd.grad(ref, [h, head.weight])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_output_match_closed_forms():
    yt = [torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)]
    ys = [torch.full((1, 2, 4), 2.0), torch.full((1, 2, 4), 1.0)]
    mse, n = output_match_loss(ys, yt, kind="mse")
    # per token: mean over layers of mean over channels of d²: (4 + 1) / 2 = 2.5; two tokens
    assert n == 2 and mse.item() == pytest.approx(5.0)
    l2, _ = output_match_loss(ys, yt, kind="l2")
    # ‖d‖/√C: layer 0: √16/2 = 2, layer 1: √4/2 = 1 → mean 1.5 per token
    assert l2.item() == pytest.approx(3.0)
    mask = torch.tensor([[1, 0]])
    l2m, nm = output_match_loss(ys, yt, mask, kind="l2")
    assert nm == 1 and l2m.item() == pytest.approx(1.5)
    zero, _ = output_match_loss(yt, yt, kind="l2")
    assert zero.item() == 0.0
    with pytest.raises(ValueError):
        output_match_loss(ys, yt, kind="huber")


def test_shift_labels_shifts_once_and_masks():
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 12 and 13 are the assistant's
    labels, w = shift_labels(ids, loss_mask)
    assert labels[0, :4].tolist() == [11, 12, 13, 14]
    # position 1 predicts 12, position 2 predicts 13: those two count
    assert w[0].tolist() == [False, True, True, False, False]
    # a new packed document (position 0) is not a target of the previous document
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    _, w2 = shift_labels(ids, None, pos)
    assert w2[0].tolist() == [True, True, False, True, False]


def test_masked_ce_against_manual_sum():
    logits = torch.randn(1, 5, 20)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    loss_mask = torch.tensor([[0, 1, 1, 0, 1]])
    total, n = masked_ce(logits, ids, loss_mask)
    manual = sum(-torch.log_softmax(logits[0, t], -1)[ids[0, t + 1]] for t in (0, 1, 3))
    assert n == 3
    torch.testing.assert_close(total, manual, rtol=1e-5, atol=1e-5)
    total_c, _ = masked_ce(logits, ids, loss_mask, chunk_size=1)
    torch.testing.assert_close(total_c, total)


def test_ce_from_hidden_equals_masked_ce():
    head = torch.nn.Linear(4, 9)
    h = torch.randn(2, 6, 4, requires_grad=True)
    ids = torch.randint(0, 9, (2, 6))
    lm = torch.randint(0, 2, (2, 6))
    a, n = ce_loss_from_hidden(h, head, ids, lm, chunk_size=2)
    b, m = masked_ce(head(h), ids, lm)
    assert n == m
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, h)[0], torch.autograd.grad(b, h)[0])
