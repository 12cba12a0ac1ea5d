"""Learning-rate schedules: linear warmup, then cosine decay to `min_lr` or constant."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, min_ratio: float, kind: str = "cosine"
) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based: the LR used for the step-th update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r} (cosine or constant)")
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float, min_lr: float, kind: str
) -> LambdaLR:
    """One multiplier for every param group, so a separate mixer LR keeps its ratio to the rest."""
    min_ratio = min_lr / lr if lr > 0 else 0.0
    return LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, min_ratio, kind))
