"""The one teacher → student KL (arwkv.ops.divergence) against a float64 hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from arwkv.ops.divergence import (
    TeacherTopK,
    kl_from_log_probs,
    kl_per_token,
    shared_log_probs,
    teacher_topk,
    topk_kl_per_token,
    topk_kl_per_token_reference,
)


def _hand_kl(zs: list[float], zt: list[float], temperature: float = 1.0) -> float:
    """KL(p_T ‖ p_S) over the shared ids, written out with math (no torch)."""
    v = min(len(zs), len(zt))
    zs, zt = [z / temperature for z in zs[:v]], [z / temperature for z in zt[:v]]
    ls, lt = math.log(sum(map(math.exp, zs))), math.log(sum(map(math.exp, zt)))
    return sum(math.exp(t - lt) * ((t - lt) - (s - ls)) for s, t in zip(zs, zt, strict=True))


def test_kl_equals_the_hand_computation_at_a_temperature():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    got = kl_per_token(zs, zt, temperature=2.0)
    for i in range(5):
        want = 4.0 * _hand_kl(zs[i].tolist(), zt[i].tolist(), 2.0)
        assert got[i].item() == pytest.approx(want, rel=1e-5)


def test_a_padded_vocabulary_is_truncated_and_renormalised():
    g = torch.Generator().manual_seed(1)
    zt = torch.randn(3, 8, generator=g)
    zs = torch.cat([torch.randn(3, 8, generator=g), torch.full((3, 4), 5.0)], -1)  # 4 padding ids, large
    log_ps, log_pt = shared_log_probs(zs, zt)
    assert log_ps.shape == log_pt.shape == (3, 8)
    torch.testing.assert_close(log_ps.exp().sum(-1), torch.ones(3))
    for i in range(3):
        assert kl_per_token(zs, zt)[i].item() == pytest.approx(
            _hand_kl(zs[i].tolist(), zt[i].tolist()), rel=1e-5
        )


def test_fp64_stays_fp64_and_bf16_is_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    zs, zt = (
        torch.randn(4, 50, generator=g, dtype=torch.float64),
        torch.randn(4, 50, generator=g, dtype=torch.float64),
    )
    exact = kl_per_token(zs, zt)
    assert exact.dtype == torch.float64
    for i in range(4):
        assert exact[i].item() == pytest.approx(_hand_kl(zs[i].tolist(), zt[i].tolist()), rel=1e-12)
    assert kl_per_token(zs.bfloat16(), zt.bfloat16()).dtype == torch.float32


def test_kl_is_zero_on_itself_and_positive_otherwise():
    z = torch.randn(6, 30, generator=torch.Generator().manual_seed(3))
    assert kl_per_token(z, z).abs().max().item() < 1e-6
    assert (kl_from_log_probs(*shared_log_probs(z.flip(0), z)) > 0).all()


# ----------------------------------------------------------------------------------------------------------
# The fused top-k KL against its autograd reference


def _case(n=6, v=40, k=8, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return zs, teacher_topk(zt, k)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("k", [1, 8, 40])  # 40 = the whole vocabulary: no tail left
def test_fused_topk_kl_and_gradient_equal_the_reference(temperature, k):
    zs, top = _case(k=k)
    a = zs.clone().requires_grad_()
    b = zs.clone().requires_grad_()
    fused = topk_kl_per_token(a, top, temperature)
    ref = topk_kl_per_token_reference(b, top, temperature)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    w = torch.rand(len(zs), generator=torch.Generator().manual_seed(9))  # unequal upstream gradients
    (fused * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_fused_topk_kl_gradcheck_in_fp64():
    zs, top = _case(n=3, v=12, k=4, dtype=torch.float64)
    top = TeacherTopK(top.ids.int(), top.logp.double(), top.tail_logp.double())  # int32 ids as cached
    z = zs.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: topk_kl_per_token(x, top, 1.5), (z,))


def test_fused_topk_kl_on_a_student_sure_of_the_teachers_tokens():
    """Where the student puts (almost) no mass outside the teacher's top-k, the tail is clamped as in the
    reference (no gradient through it) and nothing becomes inf or NaN; bf16 logits are computed in fp32."""
    zs, top = _case(k=8)
    zs = zs.scatter(-1, top.ids, 60.0)  # the top-k ids far above the rest: tail mass ~e^-60
    for z in (zs, zs.bfloat16()):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        fused, ref = topk_kl_per_token(a, top), topk_kl_per_token_reference(b, top)
        assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        fused.sum().backward()
        ref.sum().backward()
        assert a.grad.dtype == z.dtype and torch.isfinite(a.grad.float()).all()
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-3, atol=1e-5)
