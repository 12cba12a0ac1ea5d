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
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from arwkv.ops.local_attention import sink_window_attention


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
    B, _, T, _ = query.shape
    S = key.shape[2]
    if sliding_window:  # a teacher that already slides (Mistral) keeps the tighter window
        window = min(window, int(sliding_window))
    real = torch.ones(B, S, dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        real = attention_mask[:, -S:].to(device=query.device, dtype=torch.bool)
    k_pos = torch.arange(S, device=query.device)
    out = sink_window_attention(
        query,
        key,
        value,
        q_pos=k_pos[S - T :],
        k_pos=k_pos,
        k_rank=real.long().cumsum(-1) - 1,
        k_real=real,
        window=window,
        sinks=sinks,
        scale=scaling,
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
