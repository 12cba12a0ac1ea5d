"""Sink + sliding-window softmax attention over explicit key positions (with a dense reference beside it).

Query i may attend to key j when j is a real token of the same document, not in i's future, and either
recent (`q_pos - k_pos < window`, HF's `sliding_window` rule) or one of its document's first `sinks` real
tokens (StreamingLLM). Positions are given explicitly so the same kernel serves training rows, packed
documents (segment ids) and a generation cache that keeps only the sinks and the last `window` keys.

The fast path processes queries in blocks and gathers, per block, only the keys any query in it may see:
O(T · (window + block + sinks)) memory instead of a T × S mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# <local-attention>
# Sink + sliding-window attention. Copied from arwkv/ops/local_attention.py into the student's modeling file.
LOCAL_BLOCK = 256  # queries per block


def allowed_keys(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_rank: torch.Tensor,
    k_real: torch.Tensor,
    window: int,
    sinks: int,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Q, K] bool mask. q_pos [Q], k_pos [K] (long); k_rank / k_real / k_seg [B, K]; q_seg [B, Q].

    A key at the query's own position is always allowed, so a padding query never sees an empty row.
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    recent = (q_pos[:, None] - k_pos[None, :]) < window
    sink = (k_rank < sinks) & k_real
    allowed = causal[None] & (recent[None] | sink[:, None, :]) & k_real[:, None, :]
    if q_seg is not None and k_seg is not None:
        allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])
    return allowed | (k_pos[None, :] == q_pos[:, None])[None]


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_rank: torch.Tensor,
    k_real: torch.Tensor,
    window: int,
    sinks: int,
    scale: float | None = None,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, T, D]; k, v [B, Hkv, S, D] (GQA: Hq a multiple of Hkv); q_pos increasing -> [B, Hq, T, D]"""
    T = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    any_sink = ((k_rank < sinks) & k_real).any(0)  # [S]: a sink of some row
    out = q.new_empty(q.shape)
    for q0 in range(0, T, LOCAL_BLOCK):
        q1 = min(q0 + LOCAL_BLOCK, T)
        lo, hi = q_pos[q0] - window + 1, q_pos[q1 - 1]
        keys = (((k_pos >= lo) | any_sink) & (k_pos <= hi)).nonzero().squeeze(-1)
        mask = allowed_keys(
            q_pos[q0:q1],
            k_pos[keys],
            k_rank[:, keys],
            k_real[:, keys],
            window,
            sinks,
            q_seg[:, q0:q1] if q_seg is not None else None,
            k_seg[:, keys] if k_seg is not None else None,
        )
        out[:, :, q0:q1] = F.scaled_dot_product_attention(
            q[:, :, q0:q1], k[:, :, keys], v[:, :, keys], attn_mask=mask[:, None], scale=scale
        )
    return out


# </local-attention>


def sink_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_rank: torch.Tensor,
    k_real: torch.Tensor,
    window: int,
    sinks: int,
    scale: float | None = None,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense eager softmax over the full [B, H, T, S] score matrix. Same arguments as the fast path."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    mask = allowed_keys(q_pos, k_pos, k_rank, k_real, window, sinks, q_seg, k_seg)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).to(q.dtype)
