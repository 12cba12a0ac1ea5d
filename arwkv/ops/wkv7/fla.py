"""Adapter to flash-linear-attention's Triton RWKV-7 kernels (CUDA only). fla takes our layout as is."""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def fla_available() -> bool:
    """True when fla's RWKV-7 ops import and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7  # noqa: F401
    except Exception:  # fla raises assorted errors when triton or the driver is missing
        return False
    return True


def wkv7_fla(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    safe_lower_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla ``chunk_rwkv7`` for training and prefill, ``fused_recurrent_rwkv7`` for no-grad short inputs.

    ``scale`` is always passed explicitly: fla's recurrent kernels default to 1/sqrt(K), RWKV uses 1.0.
    ``safe_lower_bound``: a bound on the log-decay (RWKV-7's clamp) that lets fla use its faster
    tensor-core "safe gate" path, where the installed fla supports it.
    """
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state)
    )
    if not needs_grad and r.shape[1] < 16 and cu_seqlens is None:
        return fused_recurrent_rwkv7(
            r, w, k, v, a, b, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    kwargs = {}
    if chunk_size is not None:
        if "chunk_size" not in _params(chunk_rwkv7):
            raise ValueError("the installed fla's chunk_rwkv7 takes no chunk_size; upgrade fla or pass None")
        kwargs["chunk_size"] = chunk_size
    if safe_lower_bound is not None and "safe_gate" in _params(chunk_rwkv7):
        kwargs.update(safe_gate=True, lower_bound=safe_lower_bound)
    return chunk_rwkv7(
        r,
        w,
        k,
        v,
        a,
        b,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **kwargs,
    )


@functools.cache
def _params(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)
