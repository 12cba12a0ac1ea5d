"""``wkv6``: the RWKV-6 ("Finch") WKV operator behind one seam, with fla's conventions (see README.md)."""

from __future__ import annotations

import torch

from arwkv.errors import ArwkvError
from arwkv.ops.checks import check_packing_and_state
from arwkv.ops.wkv6.chunked import wkv6_chunked, wkv6_step
from arwkv.ops.wkv6.fla import fla_available, wkv6_fla
from arwkv.ops.wkv6.naive import wkv6_recurrent

__all__ = [
    "wkv6",
    "wkv6_chunked",
    "wkv6_recurrent",
    "wkv6_step",
    "raw_to_logdecay",
    "Wkv6InputError",
    "CHUNK_SIZE_DEFAULT",
]

BACKENDS = ("auto", "recurrent", "chunked", "fla")
#: chunked backend's chunk size when none is given (fastest of 16/32/64 for N=64 on CPU: benchmarks/wkv6.py)
CHUNK_SIZE_DEFAULT = 32


class Wkv6InputError(ArwkvError, ValueError):
    """Arguments to ``wkv6`` have the wrong shape, dtype, range or combination."""


def raw_to_logdecay(w_raw: torch.Tensor) -> torch.Tensor:
    """BlinkDL's RWKV-6 decay parameter (kernels compute ``exp(-exp(w_raw))``) → log-decay ``-exp(w_raw)``,
    in at least fp32 (decays near 1 must not round to 1)."""
    return -torch.exp(w_raw.float() if w_raw.dtype in (torch.float16, torch.bfloat16) else w_raw)


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-6 WKV: ``o_t = scale·(h_{t-1} + diag(u) k_t v_tᵀ)ᵀ r_t``, ``h_t = e^{w_t} ⊙ h_{t-1} + k_t v_tᵀ``.

    Args:
        r, k, w: ``[B, T, H, K]``; ``w`` is the log-decay (≤ 0, any magnitude; keep it fp32).
        v: ``[B, T, H, V]``.
        u: ``[H, K]`` bonus of the current token ("time_first" / "time_faaaa" in BlinkDL's checkpoints).
        scale: output scale; RWKV-6 uses 1.0 (fla defaults to 1/sqrt(K): this seam never does).
        initial_state: ``[N, H, K, V]`` fp32 (fp64 with fp64 inputs), rows = key (fla layout); N = B, or the
            number of sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int ``[N + 1]`` offsets of packed sequences (B must be 1); the state restarts at each.
        backend: "recurrent" (reference), "chunked" (pure PyTorch), "fla" (Triton, CUDA) or "auto"
            (fla on CUDA when installed, else chunked).
        chunk_size: chunk length of "chunked"; None = ``CHUNK_SIZE_DEFAULT``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in v's dtype; ``final_state`` ``[N, H, K, V]`` or None.
    """
    _check_inputs(r, k, v, w, u, initial_state, cu_seqlens, backend, chunk_size)
    w_max = float(w.detach().max())
    if not w_max <= 0 or not bool(torch.isfinite(w.detach()).all()):  # `not <=` also catches NaN
        raise Wkv6InputError(
            f"w is the log-decay and must be finite and <= 0 everywhere; got max {w_max} (BlinkDL's RWKV-6 "
            "decay parameter w_raw converts with arwkv.ops.wkv6.raw_to_logdecay: -exp(w_raw))"
        )
    if backend == "auto":
        backend = "fla" if r.is_cuda and fla_available() else "chunked"
    args = (r, k, v, w, u, scale, initial_state, output_final_state, cu_seqlens)
    if backend == "recurrent":
        return wkv6_recurrent(*args)
    if backend == "fla":
        if not (r.is_cuda and fla_available()):
            raise Wkv6InputError(
                "backend='fla' needs CUDA tensors and flash-linear-attention installed "
                "(pip install flash-linear-attention); use backend='chunked' on CPU"
            )
        return wkv6_fla(*args)
    return wkv6_chunked(*args, chunk_size=CHUNK_SIZE_DEFAULT if chunk_size is None else chunk_size)


def _check_inputs(r, k, v, w, u, initial_state, cu_seqlens, backend, chunk_size) -> int:
    """Raise Wkv6InputError on inconsistent arguments; return the number of sequences N."""
    if backend not in BACKENDS:
        raise Wkv6InputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    named = dict(r=r, k=k, v=v, w=w)
    for name, x in named.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise Wkv6InputError(
                f"{name} must be a 4-D floating tensor [B, T, H, N]; got "
                f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}"
            )
    for name, x in (*named.items(), ("u", u)):
        if isinstance(x, torch.Tensor) and x.device != r.device:
            raise Wkv6InputError(
                f"all inputs must be on one device; r is on {r.device}, {name} on {x.device}"
            )
    B, T, H, K = r.shape
    for name in ("k", "w"):
        if named[name].shape != r.shape:
            raise Wkv6InputError(
                f"{name} has shape {tuple(named[name].shape)} but r has {tuple(r.shape)}; "
                "r, k, w must all be [B, T, H, K]"
            )
    if v.shape[:3] != r.shape[:3]:
        raise Wkv6InputError(f"v has shape {tuple(v.shape)}; it must be [B, T, H, V] = [{B}, {T}, {H}, V]")
    if not isinstance(u, torch.Tensor) or not u.is_floating_point() or tuple(u.shape) != (H, K):
        raise Wkv6InputError(
            f"u (the bonus) must be a floating tensor [H, K] = [{H}, {K}]; got "
            f"{tuple(getattr(u, 'shape', ())) or type(u).__name__}"
        )
    return check_packing_and_state(
        Wkv6InputError,
        B=B,
        T=T,
        H=H,
        K=K,
        V=v.shape[-1],
        device=r.device,
        fp64=any(x.dtype == torch.float64 for x in (*named.values(), u)),
        chunk_size=chunk_size,
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        state_hint="",
    )
