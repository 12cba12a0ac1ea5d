"""The zero-training baseline every conversion must beat: the teacher with sliding-window attention + sinks.

Each query attends to the `window` most recent positions (itself included, HF's `sliding_window` rule
`q - k < window`) plus the first `sinks` real tokens of its sequence (StreamingLLM "attention sinks"), with
the teacher's weights untouched (peers.md §0 item 3: window 64, 4 sinks).

It is implemented as an attention function registered with transformers' `AttentionInterface` (plus a mask
function that hands it the plain 2D padding mask), so it works for every family that dispatches through that
interface (Llama, Qwen2, Qwen3, Mistral in transformers 5.x) and costs O(T·(window + block)) memory instead
of a T×T mask: 32k-token passkey prompts fit on a laptop.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

_BLOCK = 256  # queries per block; keys per block are sinks + window + block


def sink_window_allowed(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_rank: torch.Tensor,
    key_real: torch.Tensor,
    window: int,
    sinks: int,
) -> torch.Tensor:
    """[B, Q, K] bool: may query position q attend to key position k.

    key_rank: index of each key among its sequence's real tokens ([B, K]); key_real: key is not padding.
    The diagonal is always allowed so that padding queries never see an empty row (NaN in softmax).
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    recent = (q_pos[:, None] - k_pos[None, :]) < window
    sink = (key_rank < sinks) & key_real
    allowed = causal[None] & (recent[None] | sink[:, None, :]) & key_real[:, None, :]
    return allowed | (k_pos[None, :] == q_pos[:, None])[None]


def _sink_window_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    window: int,
    sinks: int,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    # query [B, Hq, T, D]; key/value [B, Hkv, S, D], S ≥ T when a cache holds earlier tokens.
    B, Hq, T, D = query.shape
    S = key.shape[2]
    if sliding_window:  # a teacher that already slides (Mistral) keeps the tighter window
        window = min(window, int(sliding_window))
    groups = Hq // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    real = torch.ones(B, S, dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        real = attention_mask[:, -S:].to(device=query.device, dtype=torch.bool)
    rank = real.long().cumsum(-1) - 1
    # Sinks sit within the first `last_sink` key positions of every row (left padding pushes them right).
    is_sink = (rank < sinks) & real
    last_sink = int(is_sink.nonzero()[:, 1].max().item()) + 1 if is_sink.any() else 0
    q_offset = S - T
    out = torch.empty_like(query)
    for q0 in range(0, T, _BLOCK):
        q1 = min(q0 + _BLOCK, T)
        lo = max(0, q0 + q_offset - window + 1)
        keys = torch.arange(lo, q1 + q_offset, device=query.device)
        if last_sink > 0 and lo > 0:
            keys = torch.cat([torch.arange(min(last_sink, lo), device=query.device), keys])
        q_pos = torch.arange(q0, q1, device=query.device) + q_offset
        mask = sink_window_allowed(q_pos, keys, rank[:, keys], real[:, keys], window, sinks)
        out[:, :, q0:q1] = F.scaled_dot_product_attention(
            query[:, :, q0:q1], key[:, :, keys], value[:, :, keys], attn_mask=mask[:, None], scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


def _padding_mask_only(*, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    # Hand the 2D padding mask through untouched; the attention function builds its own pattern per block.
    return attention_mask


def register(window: int = 64, sinks: int = 4) -> str:
    """Register the attention + mask functions for (window, sinks); returns the implementation name."""
    name = f"arwkv_sink{sinks}_window{window}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        return _sink_window_attention(
            module, query, key, value, attention_mask, window=window, sinks=sinks, **kwargs
        )

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _padding_mask_only)
    return name


@contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Temporarily switch a transformers model's attention implementation (config-level, all layers)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield model
    finally:
        config._attn_implementation = previous


class SinkWindowBaseline(nn.Module):
    """The teacher, unchanged, seen through sink + sliding-window attention. A drop-in causal LM for eval.

    It shares the teacher's weights (no copy): evaluating the teacher and its baseline in one run costs one
    model's memory. Packed sequences (position_ids restarts without an attention mask) are not supported.
    """

    def __init__(self, teacher: nn.Module, window: int = 64, sinks: int = 4):
        super().__init__()
        self.teacher = teacher
        self.window, self.sinks = window, sinks
        self.impl = register(window, sinks)
        self.config = teacher.config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        with attention_implementation(self.teacher, self.impl):
            return self.teacher(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )

    def extra_repr(self) -> str:
        return f"window={self.window}, sinks={self.sinks}"
