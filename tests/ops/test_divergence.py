"""The one teacher → student KL (arwkv.ops.divergence) against a float64 hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from arwkv.ops.divergence import kl_from_log_probs, kl_per_token, shared_log_probs


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
