"""RWKV-7 WKV on CPU through the C++ per-token recurrence of ``wkv7_cpu.cpp`` (built on first use).

Same contract as ``wkv7_chunked`` (fla layout, fp64 in -> fp64, anything else computed in fp32, output in v's
dtype, fp32 state) and the same backward, exact to rounding against ``naive.wkv7_recurrent``. Threads: as many
as ``torch.get_num_threads()``, each taking whole (sequence, head) recurrences from a shared queue, so a core
that another process keeps busy slows only its own share (no per-op thread barriers).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from arwkv.ops import native_build

SOURCE = Path(__file__).with_name("wkv7_cpu.cpp")
#: the backward recomputes the states of this many tokens at a time from a forward checkpoint
CHECKPOINT_EVERY = 32
#: below this many state multiply-adds (tokens * heads * K * V) one thread does the whole call (decode steps)
SERIAL_WORK = 1 << 21
#: the kernel keeps a value-sized row on the stack
MAX_VALUE_SIZE = 1024

_P = ctypes.c_void_p
_I = ctypes.c_int64


_LIBRARY: ctypes.CDLL | None = None  # the loaded library, once typed (decode steps call it ~30 times a token)


def _library() -> ctypes.CDLL | str:
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    lib = native_build.load(SOURCE)
    if isinstance(lib, ctypes.CDLL) and not getattr(lib, "_arwkv_typed", False):
        lib.arwkv_wkv7_forward.argtypes = [ctypes.c_int, _I, _P, _I, _I, _I, *[_P] * 6, ctypes.c_double]
        lib.arwkv_wkv7_forward.argtypes += [_P, _P, _P, _P, _I, _I]
        lib.arwkv_wkv7_backward.argtypes = [ctypes.c_int, _I, _P, _I, _I, _I, *[_P] * 6, ctypes.c_double]
        lib.arwkv_wkv7_backward.argtypes += [_P, _I, _P, _P, *[_P] * 7, _I]
        lib._arwkv_typed = True
        _LIBRARY = lib
    return lib


def native_available() -> bool:
    """True when the C++ kernel is built (or builds now) and loads on this machine."""
    return isinstance(_library(), ctypes.CDLL)


def native_problem() -> str | None:
    """Why the C++ kernel is unavailable, or None."""
    lib = _library()
    return None if isinstance(lib, ctypes.CDLL) else lib


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # skips the no-op dispatches of .to()/.contiguous(): a decode step makes ~200 of these calls
    if x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def _threads(work: int) -> int:
    return 1 if work < SERIAL_WORK else torch.get_num_threads()


def _forward(r, w, k, v, a, b, h0, offsets, scale: float, cdt: torch.dtype, save: bool):
    """Run the C++ forward on [tokens, H, D] inputs; with `save`, also what the backward needs."""
    lib = _library()
    tokens, H, K = r.shape
    V, nseq = v.shape[-1], len(offsets) - 1
    xs = [_as(x, cdt) for x in (r, w, k, v, a, b)]
    xs[1] = xs[1].exp()  # the kernel takes the decay itself
    h0c = None if h0 is None else _as(h0, cdt)
    o = torch.empty(tokens, H, V, dtype=cdt)
    hT = torch.empty(nseq, H, K, V, dtype=cdt)
    ckpt = None
    if save:
        lengths = offsets[1:] - offsets[:-1]
        ckpt = torch.empty(
            int(((lengths + CHECKPOINT_EVERY - 1) // CHECKPOINT_EVERY).sum()), H, K, V, dtype=cdt
        )
    lib.arwkv_wkv7_forward(
        int(cdt == torch.float64), nseq, offsets.data_ptr(), H, K, V, *map(_ptr, xs), float(scale),
        _ptr(h0c), o.data_ptr(), hT.data_ptr(), _ptr(ckpt), CHECKPOINT_EVERY, _threads(tokens * H * K * V),
    )  # fmt: skip
    return o, hT, (*xs, ckpt)


class _Wkv7Native(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, h0, offsets, scale, cdt):
        o, hT, saved = _forward(r, w, k, v, a, b, h0, offsets, scale, cdt, save=True)
        ctx.save_for_backward(*saved, offsets)
        ctx.meta = (scale, cdt, [(x.dtype, x.shape) for x in (r, w, k, v, a, b)])
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return o.to(v.dtype), hT

    @staticmethod
    def backward(ctx, do, dhT):
        r, decay, k, v, a, b, ckpt, offsets = ctx.saved_tensors  # read once (non-reentrant checkpointing)
        scale, cdt, inputs = ctx.meta
        tokens, H, K = r.shape
        V, nseq = v.shape[-1], len(offsets) - 1
        do = torch.zeros(tokens, H, V, dtype=cdt) if do is None else do.to(cdt).contiguous()
        dhT = None if dhT is None else dhT.to(cdt).contiguous()
        grads = [torch.empty_like(x) for x in (r, decay, k, v, a, b)]
        dh0 = None if ctx.h0_dtype is None else torch.empty(nseq, H, K, V, dtype=cdt)
        _library().arwkv_wkv7_backward(
            int(cdt == torch.float64), nseq, offsets.data_ptr(), H, K, V, *map(_ptr, (r, decay, k, v, a, b)),
            float(scale), ckpt.data_ptr(), CHECKPOINT_EVERY, do.data_ptr(), _ptr(dhT), *map(_ptr, grads),
            _ptr(dh0), _threads(3 * tokens * H * K * V),
        )  # fmt: skip
        out = [g.to(dtype).view(shape) for g, (dtype, shape) in zip(grads, inputs, strict=True)]
        return (*out, None if dh0 is None else dh0.to(ctx.h0_dtype), None, None, None)


def wkv7_native(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-7 WKV on CPU, fla layout: r, w (log-decay), k, a, b [B, T, H, K]; v [B, T, H, V]; states
    [N, H, K, V]. Needs ``native_available()``. Returns (o [B, T, H, V] in v's dtype, final state or None)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    if V > MAX_VALUE_SIZE:
        raise ValueError(f"the native WKV-7 kernel takes head value sizes up to {MAX_VALUE_SIZE}, got {V}")
    cdt = torch.float64 if any(x.dtype == torch.float64 for x in (r, w, k, v, a, b)) else torch.float32
    if cu_seqlens is not None:
        offsets = cu_seqlens.to(torch.int64).contiguous()
    else:
        offsets = torch.arange(0, (B + 1) * T, T, dtype=torch.int64)
    flat = [x.reshape(B * T, H, x.shape[-1]) for x in (r, w, k, v, a, b)]
    with torch.autocast("cpu", enabled=False):  # computes in cdt whatever an enclosing autocast asks
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (*flat, initial_state)):
            o, hT = _Wkv7Native.apply(*flat, initial_state, offsets, scale, cdt)
        else:
            o, hT, _ = _forward(*flat, initial_state, offsets, scale, cdt, save=False)
            o = o.to(v.dtype)
    return o.view(B, T, H, V), (hT if output_final_state else None)
