"""Adapter to flash-linear-attention's Triton RWKV-6 kernels (CUDA only; never imported on CPU).

fla's ``chunk_rwkv6`` / ``fused_recurrent_rwkv6`` take our layout and argument order as is:
``(r, k, v, w, u)`` with ``w`` the log-decay, ``u`` ``[H, K]``, states ``[N, H, K, V]`` (rows = key).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def fla_available() -> bool:
    """True when fla's RWKV-6 ops import and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6  # noqa: F401
    except Exception:  # fla raises assorted errors when triton or the driver is missing
        return False
    return True


def wkv6_fla(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla ``chunk_rwkv6`` for training and prefill, ``fused_recurrent_rwkv6`` for no-grad short inputs.

    ``scale`` is always passed: fla defaults to 1/sqrt(K), RWKV-6 uses 1.0.
    """
    from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6

    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, k, v, w, u, initial_state)
    )
    kernel = fused_recurrent_rwkv6 if not needs_grad and r.shape[1] < 16 else chunk_rwkv6
    return kernel(
        r,
        k,
        v,
        w,
        u,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
