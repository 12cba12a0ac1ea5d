"""How a WKV-7 call picks its kernel: the one dispatch that ``arwkv.ops.wkv7.wkv7`` and the student both run.

The block between the ``wkv7-dispatch`` markers is copied verbatim into the student's single-file modeling
code (``tools/check_copies.py``), after the ``wkv7-chunked`` block whose ``wkv7_chunked`` it calls, so it
uses nothing but ``torch`` and the standard library. What differs between the two callers is passed in, not
copied: how fla and the native CPU kernel are found (``find_fla`` / ``find_native``), the exception type for
a bad backend/device pair, whether fla is given a chunk size, and fla's safe-gate decay bound.
"""

from __future__ import annotations

import functools
import inspect

import torch

from arwkv.ops.wkv7.chunked import wkv7_chunked

# <wkv7-dispatch>
# Kernel choice for RWKV-7 WKV. Copied from arwkv/ops/wkv7/dispatch.py (one dispatch for ops and the student).


#: chunked kernel's default chunk length (fastest of 16/32/64 at K=64 on CPU: benchmarks/wkv.py)
CHUNK_SIZE_DEFAULT = 16
#: the chunked kernel needs chunk_size * max(-w) <= this (its factors reach e^{±40} in fp32; README §3.3)
MAX_CHUNK_EXPONENT = 40.0


def wkv7_step(r, w, k, v, a, b, state: torch.Tensor, scale: float = 1.0):
    """One token of the recurrence (decode): inputs [B, 1, H, K], state [B, H, K, V]; fp64 stays fp64,
    anything else runs in fp32. Returns (o [B, 1, H, V] in the compute dtype, new state)."""
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, a, b = (t[:, 0].to(dt) for t in (r, w, k, v, a, b))
    state = state.to(dt)
    u = torch.einsum("bhkv,bhk->bhv", state, a)
    state = state * w.exp()[..., None] + k[..., None] * v[..., None, :] + b[..., None] * u[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", state, r)
    return (o if scale == 1.0 else o * scale)[:, None], state


def wkv7_chunk_size(chunk_size: int | None, max_neg_logdecay: float, error: type = ValueError) -> int:
    """The chunked kernel's chunk length: the requested one when its factorized exponents fit fp32; with none
    requested, CHUNK_SIZE_DEFAULT or the biggest power of 2 below it that fits; else `error` saying why."""
    C = CHUNK_SIZE_DEFAULT if chunk_size is None else chunk_size
    if C * max_neg_logdecay <= MAX_CHUNK_EXPONENT:
        return C
    if chunk_size is not None or max_neg_logdecay > MAX_CHUNK_EXPONENT:
        limit = int(MAX_CHUNK_EXPONENT // max_neg_logdecay)
        raise error(
            f"log-decay down to {-max_neg_logdecay:.4g} is too strong for chunk_size={C}: the chunked "
            f"backend needs chunk_size * max(-w) <= {MAX_CHUNK_EXPONENT:g} (the fp32 range of its factorized "
            "exponents). "
            + (f"Use chunk_size <= {limit}, " if limit >= 1 else "")
            + "clamp the decay (RWKV-7 keeps w >= -0.6065), or use backend='native' or 'recurrent'."
        )
    return 1 << (int(MAX_CHUNK_EXPONENT // max_neg_logdecay).bit_length() - 1)


@functools.lru_cache(maxsize=8)
def _wkv7_params(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def wkv7_fla_call(
    kernels, r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens, chunk_size, lower_bound
):
    """fla's `fused_recurrent_rwkv7` for short no-grad inputs (decode), else `chunk_rwkv7`; `kernels` is
    (chunk_rwkv7, fused_recurrent_rwkv7). `scale` is always passed (fla's recurrent kernel defaults to
    1/sqrt(K)). `lower_bound`, a bound on the log-decay, turns on fla's tensor-core safe-gate path."""
    chunk, recurrent = kernels
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (r, w, k, v, a, b, initial_state)
    )
    if not needs_grad and r.shape[1] < 16 and cu_seqlens is None:
        return recurrent(
            r, w, k, v, a, b, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    extra = {}
    params = _wkv7_params(chunk)
    if chunk_size is not None:
        if "chunk_size" not in params:
            raise ValueError("the installed fla's chunk_rwkv7 takes no chunk_size; upgrade fla or pass None")
        extra["chunk_size"] = chunk_size
    if lower_bound is not None and "safe_gate" in params:
        extra.update(safe_gate=True, lower_bound=lower_bound)
    return chunk(
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
        **extra,
    )


def wkv7_dispatch(
    r,
    w,
    k,
    v,
    a,
    b,
    scale,
    initial_state,
    output_final_state,
    cu_seqlens,
    *,
    backend: str,
    chunk_size: int | None,
    find_fla,
    find_native,
    fla_chunk_size: int | None = None,
    safe_lower_bound: float | None = None,
    max_neg_logdecay: float | None = None,
    error: type = ValueError,
):
    """Run WKV-7 on the kernel `backend` names ("auto", "chunked", "native" or "fla"; the reference recurrence
    is the caller's). "auto": fla on CUDA, the native kernel on CPU, each when `find_fla(backend)` /
    `find_native(backend)` return it (they return None under "auto" when it is unusable and raise for an
    explicit backend); otherwise one decode step for a single unpacked token, else the chunked kernel.
    Returns (o [B, T, H, V] in v's dtype, final state or None)."""
    if backend == "fla" or (backend == "auto" and r.is_cuda):
        if not r.is_cuda:
            raise error("backend='fla' needs CUDA tensors; use backend='chunked' on CPU")
        kernels = find_fla(backend)
        if kernels is not None:
            o, state = wkv7_fla_call(
                kernels, r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens,
                fla_chunk_size, safe_lower_bound,
            )  # fmt: skip
            return o.to(v.dtype), state
    elif backend in ("native", "auto"):
        if r.is_cuda:
            raise error("backend='native' is the CPU kernel; use backend='fla' or 'chunked' on CUDA")
        native = find_native(backend)
        if native is not None:
            return native(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)
    if r.shape[1] == 1 and cu_seqlens is None:
        if initial_state is None:
            initial_state = torch.zeros(*k.shape[::2], k.shape[-1], v.shape[-1], device=k.device)
        o, state = wkv7_step(r, w, k, v, a, b, initial_state, scale)
        return o.to(v.dtype), (state if output_final_state else None)
    if max_neg_logdecay is None:
        max_neg_logdecay = -float(w.detach().min())
    return wkv7_chunked(
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
        chunk_size=wkv7_chunk_size(chunk_size, max_neg_logdecay, error),
    )


# </wkv7-dispatch>
