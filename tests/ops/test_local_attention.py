"""The blocked sink + sliding-window attention equals its dense reference: padding, packed documents, a cache
of kept keys (non-contiguous positions), GQA, and query blocks beyond the first."""

from __future__ import annotations

import pytest
import torch

from arwkv.ops.local_attention import LOCAL_BLOCK, sink_window_attention, sink_window_attention_reference


def qkv(B: int, T: int, S: int, Hq: int = 4, Hkv: int = 2, D: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    return q, k, v


def both(q, k, v, **spec):
    fast = sink_window_attention(q, k, v, **spec)
    ref = sink_window_attention_reference(q, k, v, **spec)
    return fast, ref


@pytest.mark.parametrize("window,sinks", [(1, 0), (4, 2), (16, 4), (1000, 0)])
def test_fast_equals_reference_with_left_padding(window, sinks):
    T = LOCAL_BLOCK + 37  # two query blocks
    q, k, v = qkv(2, T, T)
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, :11] = False  # left padding in row 1: its sinks are its first real tokens
    pos = torch.arange(T)
    spec = dict(
        q_pos=pos, k_pos=pos, k_rank=real.long().cumsum(-1) - 1, k_real=real, window=window, sinks=sinks
    )
    fast, ref = both(q, k, v, **spec)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast[1, :, 11:], ref[1, :, 11:], rtol=1e-10, atol=1e-10)


def test_window_covering_everything_is_causal_softmax():
    T = 40
    q, k, v = qkv(1, T, T, Hq=2, Hkv=2)
    pos = torch.arange(T)
    real = torch.ones(1, T, dtype=torch.bool)
    out = sink_window_attention(
        q, k, v, q_pos=pos, k_pos=pos, k_rank=pos[None], k_real=real, window=T, sinks=0
    )
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)


def test_packed_documents_do_not_see_each_other():
    T = 30
    starts = torch.tensor([0, 9, 20])
    idx = torch.arange(T)
    seg = (torch.searchsorted(starts, idx, right=True) - 1)[None]
    rank = idx[None] - starts[seg]
    real = torch.ones(1, T, dtype=torch.bool)
    q, k, v = qkv(1, T, T)
    spec = dict(q_pos=idx, k_pos=idx, k_rank=rank, k_real=real, q_seg=seg, k_seg=seg, window=4, sinks=2)
    fast, ref = both(q, k, v, **spec)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    # the second document alone gives the same output as inside the packed row
    alone = sink_window_attention(
        q[:, :, 9:20],
        k[:, :, 9:20],
        v[:, :, 9:20],
        q_pos=torch.arange(11),
        k_pos=torch.arange(11),
        k_rank=torch.arange(11)[None],
        k_real=real[:, :11],
        window=4,
        sinks=2,
    )
    torch.testing.assert_close(fast[:, :, 9:20], alone, rtol=1e-10, atol=1e-10)


def test_kept_keys_of_a_cache_give_the_full_sequence_result():
    # keys kept by a generation cache: sinks 0..1, then the last positions; queries are the new tokens
    T_new, window, sinks = 3, 5, 2
    kept = torch.tensor([0, 1, 13, 14, 15, 16, 17])
    q_pos = torch.arange(18, 18 + T_new)
    k_pos = torch.cat([kept, q_pos])
    q, k_all, v_all = qkv(1, T_new, 18 + T_new)
    k, v = k_all[:, :, k_pos], v_all[:, :, k_pos]
    real = torch.ones(1, len(k_pos), dtype=torch.bool)
    spec = dict(q_pos=q_pos, k_pos=k_pos, k_rank=k_pos[None], k_real=real, window=window, sinks=sinks)
    fast, ref = both(q, k, v, **spec)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    everything = torch.arange(18 + T_new)
    full = sink_window_attention_reference(
        q,
        k_all,
        v_all,
        q_pos=q_pos,
        k_pos=everything,
        k_rank=everything[None],
        k_real=torch.ones(1, 18 + T_new, dtype=torch.bool),
        window=window,
        sinks=sinks,
    )
    torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-10)


def test_gradients_match_reference():
    T = 50
    q, k, v = (t.requires_grad_() for t in qkv(1, T, T))
    pos = torch.arange(T)
    spec = dict(
        q_pos=pos, k_pos=pos, k_rank=pos[None], k_real=torch.ones(1, T, dtype=torch.bool), window=6, sinks=3
    )
    g = torch.randn(1, 4, T, 8, dtype=torch.float64)
    grads = []
    for fn in (sink_window_attention, sink_window_attention_reference):
        (fn(q, k, v, **spec) * g).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
