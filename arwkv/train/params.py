"""Which parameters train, and at which learning rate.

Parameters fall into groups by name: `mixers` (the RWKV time-mixing blocks), `local_attention` (the
teacher's attention a mixer keeps with `local_window`), `embeddings`, `lm_head`,
`mlp`, `norms`, and `other` (e.g. a kept softmax attention). Frozen groups get `requires_grad=False`; the
mixers may have their own learning rate (RADLADS trains new mixers ~10x faster than the inherited weights).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from arwkv.train.forward import decoder_layers

GROUPS = ("mixers", "local_attention", "embeddings", "lm_head", "mlp", "norms", "other")


def mixer_layers(model: nn.Module) -> list[int]:
    """Indices of layers whose `self_attn` is an RWKV mixer (not a kept softmax attention)."""
    rwkv = getattr(model.config, "rwkv_layers", None)
    if rwkv is not None and getattr(model.config, "model_type", "") == "arwkv":
        return list(rwkv)
    return [
        i
        for i, layer in enumerate(decoder_layers(model))
        if not type(layer.self_attn).__name__.endswith("Attention")
    ]


def group_of(name: str, mixer_prefixes: tuple[str, ...]) -> str:
    if ".local_attn." in name:  # the teacher's attention kept inside a mixer (student.mixer.local_window)
        return "local_attention"
    if name.startswith(mixer_prefixes):
        return "mixers"
    if "embed_tokens" in name or "wte" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    return "other"


def param_groups(
    model: nn.Module,
    lr: float,
    mixer_lr: float | None = None,
    freeze: list[str] | tuple = (),
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Set requires_grad by group and return AdamW groups [{"params", "lr", "name"}] (mixers first).

    `freeze`: groups that do not train; `only`: if given, the only groups that train.
    """
    prefixes = tuple(f"model.layers.{i}.self_attn." for i in mixer_layers(model))
    mixers, rest = [], []
    for name, p in model.named_parameters():
        g = group_of(name, prefixes)
        trains = g not in freeze and (only is None or g in only)
        p.requires_grad_(trains)
        if trains:
            (mixers if g == "mixers" else rest).append(p)
    return [
        {"params": mixers, "lr": mixer_lr or lr, "name": "mixers"},
        {"params": rest, "lr": lr, "name": "rest"},
    ]
