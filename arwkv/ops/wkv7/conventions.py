"""Decay conventions and state layouts in circulation, and exact converters between them (README.md §2).

All four decay conventions describe the same per-channel decay factor ``w ∈ (0, 1)``:

* A "double-exp" ``w' = log(-log w)`` (BlinkDL CUDA kernels: the kernel computes ``exp(-exp(w'))``);
* B raw pre-sigmoid ``d`` with ``w = exp(-e^{-1/2} · sigmoid(d))`` (BlinkDL clamped training kernels);
* C log-decay ``g = log w ≤ 0`` (fla, and ``arwkv.ops.wkv7``);
* D the decay ``w`` itself (rwkv pip CPU path). Never store D in bf16: decays near 1 round to exactly 1.

States: BlinkDL keeps ``S[..., V, K]`` (rows = value), fla keeps ``h[..., K, V]`` (rows = key), ``h = Sᵀ``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: RWKV-7's decay clamp: g = log w = -e^{-1/2} · sigmoid(d) lies in (DECAY_LOG_MIN, 0).
DECAY_LOG_MIN = -math.exp(-0.5)


def d_to_logdecay(d: torch.Tensor) -> torch.Tensor:
    """B → C: ``g = -e^{-1/2} · sigmoid(d)``."""
    return DECAY_LOG_MIN * torch.sigmoid(d)


def logdecay_to_d(g: torch.Tensor) -> torch.Tensor:
    """C → B (inverse of the clamp); needs ``DECAY_LOG_MIN < g < 0``."""
    return torch.logit(g / DECAY_LOG_MIN)


def double_exp_to_logdecay(wp: torch.Tensor) -> torch.Tensor:
    """A → C: ``g = -exp(w')``."""
    return -torch.exp(wp)


def logdecay_to_double_exp(g: torch.Tensor) -> torch.Tensor:
    """C → A: ``w' = log(-g)``; needs ``g < 0``."""
    return torch.log(-g)


def d_to_double_exp(d: torch.Tensor) -> torch.Tensor:
    """B → A without leaving log space: ``w' = -softplus(-d) - 1/2`` (= log(e^{-1/2} sigmoid(d)))."""
    return -F.softplus(-d) - 0.5


def logdecay_to_decay(g: torch.Tensor) -> torch.Tensor:
    """C → D: ``w = exp(g)``, computed in at least fp32."""
    return torch.exp(g.float() if g.dtype in (torch.float16, torch.bfloat16) else g)


def decay_to_logdecay(w: torch.Tensor) -> torch.Tensor:
    """D → C: ``g = log w``, computed in at least fp32."""
    return torch.log(w.float() if w.dtype in (torch.float16, torch.bfloat16) else w)


def state_blinkdl_to_fla(S: torch.Tensor) -> torch.Tensor:
    """``S[..., V, K]`` (rows = value) → ``h[..., K, V]`` (rows = key)."""
    return S.transpose(-1, -2).contiguous()


def state_fla_to_blinkdl(h: torch.Tensor) -> torch.Tensor:
    """``h[..., K, V]`` (rows = key) → ``S[..., V, K]`` (rows = value)."""
    return h.transpose(-1, -2).contiguous()
