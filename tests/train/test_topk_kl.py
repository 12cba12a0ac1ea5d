"""The bucketed top-k KL that stage 2 uses with a teacher cache, against the full-vocabulary KL."""

from __future__ import annotations

import torch

from arwkv.ops.divergence import TeacherTopK, kl_per_token, teacher_topk, topk_kl_per_token
from arwkv.train.losses import kl_loss_from_hidden


def test_all_of_the_vocabulary_is_the_full_kl_with_its_gradient():
    zs = torch.randn(6, 40, requires_grad=True)
    zt = torch.randn(6, 40) * 3
    full = kl_per_token(zs, zt, temperature=1.5)
    (g_full,) = torch.autograd.grad(full.sum(), zs)
    top = teacher_topk(zt, 40, temperature=1.5)
    top = TeacherTopK(top.ids, top.logp, torch.full_like(top.tail_logp, float("-inf")))  # no tail at all
    approx = topk_kl_per_token(zs, top, temperature=1.5)
    (g_top,) = torch.autograd.grad(approx.sum(), zs)
    torch.testing.assert_close(approx, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_top, g_full, rtol=1e-5, atol=1e-6)


def test_fewer_buckets_never_exceed_the_full_kl_and_approach_it_with_k():
    zs = torch.randn(32, 200) * 2
    zt = torch.randn(32, 200) * 4  # a peaked teacher: most mass in few tokens
    full = kl_per_token(zs, zt)
    errors = []
    for k in (4, 16, 64, 199):
        approx = topk_kl_per_token(zs, teacher_topk(zt, k))
        assert (approx >= -1e-5).all() and (approx <= full + 1e-4).all()
        errors.append(float((full - approx).sum() / full.sum()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_the_tail_bucket_counts_the_students_mass_outside_the_top_k():
    # the student puts its mass where the teacher's tail is: only the tail bucket can see that
    zt = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0]])
    good = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0]])
    bad = torch.tensor([[0.0, 0.0, 6.0, 6.0, 6.0]])
    top = teacher_topk(zt, 2)
    assert topk_kl_per_token(good, top).item() < 1e-5
    assert topk_kl_per_token(bad, top).item() > 3.0


def test_kl_from_hidden_takes_cached_top_k_in_place_of_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    h = torch.randn(2, 5, 8, requires_grad=True)
    zt = torch.randn(10, 30) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    full, n_full, _ = kl_loss_from_hidden(h, head, lambda j: zt[j], mask=mask, chunk_size=3)
    top = teacher_topk(zt, 30)
    cached, n_top, _ = kl_loss_from_hidden(h, head, lambda j: top[j], mask=mask, chunk_size=3)
    assert n_full == n_top == 9
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    cached.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad[0, 4].abs().sum() == 0
