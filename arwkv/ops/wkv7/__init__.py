"""``wkv7``: the RWKV-7 WKV operator behind one seam, with fla's conventions (see README.md)."""

from __future__ import annotations

import torch

from arwkv.errors import ArwkvError
from arwkv.ops.checks import check_packing_and_state
from arwkv.ops.wkv7.chunked import wkv7_chunked
from arwkv.ops.wkv7.conventions import DECAY_LOG_MIN
from arwkv.ops.wkv7.dispatch import CHUNK_SIZE_DEFAULT, MAX_CHUNK_EXPONENT, wkv7_dispatch
from arwkv.ops.wkv7.fla import fla_available, fla_problem, load_fla
from arwkv.ops.wkv7.naive import wkv7_recurrent
from arwkv.ops.wkv7.native import native_available, native_problem, wkv7_native

__all__ = [
    "wkv7",
    "wkv7_chunked",
    "wkv7_recurrent",
    "wkv7_native",
    "Wkv7InputError",
    "CHUNK_SIZE_DEFAULT",
    "MAX_CHUNK_EXPONENT",
]

BACKENDS = ("auto", "recurrent", "chunked", "native", "fla")


class Wkv7InputError(ArwkvError, ValueError):
    """Arguments to ``wkv7`` have the wrong shape, dtype, range or combination."""


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-7 WKV: ``h_t = diag(e^{w_t}) h_{t-1} + k_t v_tᵀ + b_t (h_{t-1}ᵀ a_t)ᵀ``, ``o_t = scale·h_tᵀ r_t``.

    Args:
        r, w, k, a, b: ``[B, T, H, K]``; ``w`` is the log-decay (≤ 0; keep it fp32).
        v: ``[B, T, H, V]``.
        scale: output scale; RWKV-7 uses 1.0.
        initial_state: ``[N, H, K, V]`` fp32 (fp64 with fp64 inputs), rows = key (fla layout); N = B, or the
            number of sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int ``[N + 1]`` offsets of packed sequences (B must be 1); the state restarts at each.
        backend: "recurrent" (reference), "chunked" (pure PyTorch), "native" (C++ per-token recurrence,
            CPU; built on first use), "fla" (Triton, CUDA) or "auto" (fla on CUDA when installed; on CPU
            native when it builds, else chunked).
        chunk_size: chunk length of "chunked"/"fla"; None picks ``CHUNK_SIZE_DEFAULT`` for "chunked", shrunk
            when the decay is so strong that ``chunk_size · max(-w) > MAX_CHUNK_EXPONENT``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in v's dtype; ``final_state`` ``[N, H, K, V]`` or None.
    """
    _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens, backend, chunk_size)
    w_min, w_max = torch.aminmax(w.detach())
    w_min, w_max = float(w_min), float(w_max)
    if not w_max <= 0:  # also catches NaN
        raise Wkv7InputError(
            f"w is the log-decay and must be <= 0 everywhere; got max {w_max} (convert with "
            "arwkv.ops.wkv7.conventions, e.g. d_to_logdecay for raw pre-sigmoid decays)"
        )
    args = (r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)
    if backend == "recurrent":
        return wkv7_recurrent(*args)
    return wkv7_dispatch(
        *args,
        backend=backend,
        chunk_size=chunk_size,
        fla_chunk_size=chunk_size,
        find_fla=_find_fla,
        find_native=_find_native,
        safe_lower_bound=DECAY_LOG_MIN if w_min >= DECAY_LOG_MIN else None,
        max_neg_logdecay=-w_min,
        error=Wkv7InputError,
    )


def _find_fla(backend: str):
    """fla's kernels when they load here; None under "auto" (the chunked kernel runs), an error for "fla"."""
    if fla_available():
        return load_fla()
    if backend == "fla":
        raise Wkv7InputError(f"backend='fla': {fla_problem()}; or use backend='chunked'")
    return None


def _find_native(backend: str):
    """The C++ CPU kernel when it builds here; None under "auto", an error for "native"."""
    if native_available():
        return wkv7_native
    if backend == "native":
        raise Wkv7InputError(f"backend='native': {native_problem()}; or use backend='chunked'")
    return None


def _check_inputs(r, w, k, v, a, b, initial_state, cu_seqlens, backend, chunk_size) -> int:
    """Raise Wkv7InputError on inconsistent arguments; return the number of sequences N."""
    if backend not in BACKENDS:
        raise Wkv7InputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    named = dict(r=r, w=w, k=k, v=v, a=a, b=b)
    for name, x in named.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise Wkv7InputError(
                f"{name} must be a 4-D floating tensor [B, T, H, N]; got "
                f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}"
            )
        if x.device != r.device:
            raise Wkv7InputError(
                f"all inputs must be on one device; r is on {r.device}, {name} on {x.device}"
            )
    B, T, H, K = r.shape
    for name in ("w", "k", "a", "b"):
        if named[name].shape != r.shape:
            raise Wkv7InputError(
                f"{name} has shape {tuple(named[name].shape)} but r has {tuple(r.shape)}; "
                "r, w, k, a, b must all be [B, T, H, K]"
            )
    if v.shape[:3] != r.shape[:3]:
        raise Wkv7InputError(f"v has shape {tuple(v.shape)}; it must be [B, T, H, V] = [{B}, {T}, {H}, V]")
    return check_packing_and_state(
        Wkv7InputError,
        B=B,
        T=T,
        H=H,
        K=K,
        V=v.shape[-1],
        device=r.device,
        fp64=any(x.dtype == torch.float64 for x in named.values()),
        chunk_size=chunk_size,
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        state_hint="; BlinkDL [.., V, K] states need conventions.state_blinkdl_to_fla",
    )
