from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from arwkv.eval.baselines import SinkWindowBaseline, attention_implementation
from arwkv.ops import local_attention

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=8),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
}


def make(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def padded_batch(lengths: list[int], T: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def brute_force_mask(mask: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """4D additive mask written out element by element: causal, padding, last `window` keys + first `sinks`
    real tokens; the diagonal always open (what padded query rows see does not matter)."""
    B, T = mask.shape
    out = torch.full((B, 1, T, T), torch.finfo(torch.float32).min)
    for b in range(B):
        real = [j for j in range(T) if mask[b, j]]
        sink_keys = set(real[:sinks])
        for i in range(T):
            for j in range(i + 1):
                if i == j or (mask[b, j] and (i - j < window or j in sink_keys)):
                    out[b, 0, i, j] = 0.0
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_window_covering_everything_equals_the_teacher(family, side):
    model = make(family)
    ids, mask, pos = padded_batch([24, 17, 9], 24, side)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        swa = SinkWindowBaseline(model, window=24, sinks=4)(
            input_ids=ids, attention_mask=mask, position_ids=pos
        )
    real = mask.bool()
    torch.testing.assert_close(swa.logits[real], ref[real], atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # the switch is undone after the call


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_small_window_equals_brute_force_mask(family, side, monkeypatch):
    monkeypatch.setattr(local_attention, "LOCAL_BLOCK", 5)  # several query blocks, sinks outside the window
    model = make(family)
    window, sinks = 4, 2
    ids, mask, pos = padded_batch([30, 21, 13], 30, side)
    with torch.no_grad():
        swa = SinkWindowBaseline(model, window, sinks)(input_ids=ids, attention_mask=mask, position_ids=pos)
        with attention_implementation(model, "eager"):
            ref = model(input_ids=ids, attention_mask=brute_force_mask(mask, window, sinks), position_ids=pos)
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(swa.logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    assert (swa.logits[real] - full[real]).abs().max() > 1e-3  # the window really cuts something


def test_padded_rows_match_unpadded_runs():
    model = make("llama")
    base = SinkWindowBaseline(model, window=5, sinks=3)
    ids, mask, pos = padded_batch([26, 11], 26, "left")
    with torch.no_grad():
        batched = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        alone = base(input_ids=ids[1:, -11:]).logits
    torch.testing.assert_close(batched[1, -11:], alone[0], atol=1e-5, rtol=1e-5)


def test_one_layer_sees_only_sinks_and_window():
    # With one layer a position's output depends only on the keys it may attend to.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, "num_hidden_layers": 1})).eval()
    base = SinkWindowBaseline(model, window=4, sinks=2)
    ids = torch.randint(3, 96, (1, 20))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 96  # outside the sinks (0, 1) and the window of positions >= 12
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, base(input_ids=changed).logits
    torch.testing.assert_close(a[0, 12:], b[0, 12:], atol=1e-6, rtol=0)
    assert (a[0, 8:12] - b[0, 8:12]).abs().max() > 1e-4
