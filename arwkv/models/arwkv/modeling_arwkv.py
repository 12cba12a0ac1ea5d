"""The arwkv student: a Hugging Face decoder whose attention layers are RWKV-7 time mixing.

Everything except self-attention is the teacher's own module types (embeddings, RMSNorms, MLPs, final norm,
lm_head, pre-norm residual wiring); layers listed in `config.softmax_layers` keep the teacher's attention.
With `config.local_window` > 0 each mixer also keeps the teacher's attention over a short sliding window plus
sinks, and adds the RWKV state's output to it (a hybrid with constant memory per sequence).
Read top to bottom: the WKV kernel (copied from `arwkv/ops/wkv7/chunked.py`), the kernel seam `wkv7`, the
local attention (copied from `arwkv/ops/local_attention.py`), the token shift, `ArwkvTimeMix` (method.md §2),
the decoder layer, the inference cache, model, causal LM.

This file ships inside every saved checkpoint as remote code: it imports only torch and transformers
(fla optionally, on CUDA; arwkv's C++ CPU kernel optionally, when the arwkv package is installed).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import math
import re
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AttentionInterface,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_arwkv import ArwkvConfig

logger = logging.get_logger(__name__)

# log w = -e^{-1/2} * sigmoid(d): decays in (0.545, 1), rwkv7-operator.md §1.2 (convention C, fla's)
DECAY_SCALE = -math.exp(-0.5)

# Teacher families whose module classes this file instantiates: model_type -> class prefix in transformers.
TEACHER_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


# -----------------------------------------------------------------------------------------------------------
# WKV-7 kernel. The two blocks between markers are verbatim copies of arwkv/ops/wkv7/chunked.py (the kernel)
# and arwkv/ops/wkv7/dispatch.py (which kernel runs), kept in sync by tools/check_copies.py. fla conventions:
# r, k, a, b [B, T, H, K]; v [B, T, H, V]; w = log-decay <= 0;
# state [B, H, K, V] fp32 (rows = key): S_t = diag(w_t) S_{t-1} + k_t v_tᵀ + b_t (S_{t-1}ᵀ a_t)ᵀ,
# o_t = S_tᵀ r_t.


# fmt: off
# <wkv7-chunked>
# RWKV-7 WKV, chunked form. Copied from arwkv/ops/wkv7/chunked.py (derivation: arwkv/ops/wkv7/README.md).
# Precondition (checked by arwkv.ops.wkv7, not here): chunk_size * max(-w) <= 40, i.e. any chunk_size <= 64
# for RWKV-7's clamped log-decay w >= -0.6065. Beyond it the factorized exponents overflow fp32.


_WKV7_GROUP_ROWS = 2048
_WKV7_SAVED = 12  # tensors kept per group for the backward: v, Hp, U and the 9 of _wkv7_prep


def wkv7_schedule(offsets: list[int], C: int, H: int, device: torch.device):
    """Chunk order for sequences [offsets[i], offsets[i+1]) of one flat token axis.

    Chunks are laid out step-major (all first chunks, then all second chunks, ...) over the sequences sorted
    longest first, so sequential step n is one contiguous slice of the `active[n]` still-running sequences.
    Returns `active`, `order` (slot -> sequence), `rows`: for each (chunk, head, position) row its row in
    x.reshape(tokens * H, D) (padding rows point at row 0), `valid` (None when there is no padding), `unsort`.
    """
    N = len(offsets) - 1
    nch = [-(-(offsets[i + 1] - offsets[i]) // C) for i in range(N)]
    order = sorted(range(N), key=lambda s: -nch[s])
    steps = nch[order[0]] if N else 0
    hist = [0] * (steps + 1)
    for c in nch:
        hist[c] += 1
    active, alive = [], N
    for n in range(steps):
        alive -= hist[n]
        active.append(alive)
    M = sum(active)
    act = torch.tensor(active, dtype=torch.long)
    starts = torch.tensor([offsets[s] for s in order], dtype=torch.long)
    ends = torch.tensor([offsets[s + 1] for s in order], dtype=torch.long)
    step = torch.repeat_interleave(torch.arange(steps), act)
    slot = torch.arange(M) - torch.repeat_interleave(act.cumsum(0) - act, act)
    tok = (starts[slot] + step * C)[:, None, None] + torch.arange(C)  # [M, 1, C] token of each chunk row
    ok = tok < ends[slot][:, None, None]
    rows = (torch.where(ok, tok, 0) * H + torch.arange(H)[:, None]).flatten()  # [M * H * C]
    valid = ok.expand(M, H, C).flatten()
    unsort = torch.empty(N, dtype=torch.long)
    unsort[torch.tensor(order, dtype=torch.long)] = torch.arange(N)
    valid = None if bool(valid.all()) else valid.to(device)
    return active, torch.tensor(order, device=device), rows.to(device), valid, unsort.to(device)


def _wkv7_inv_unit_lower(A: torch.Tensor) -> torch.Tensor:
    """(I - A)^-1 for strictly lower-triangular A [.., C, C] (no autograd; README §3.2).

    Blocks of 16 use the exact product (I + A)(I + A^2)(I + A^4)(I + A^8) (A^16 = 0 there); longer chunks
    combine those blocks by block forward substitution, because the power sums of a long chunk cancel badly
    in fp32 when C >> K and the transitions are near-projections.
    """
    C, bs = A.shape[-1], 16
    if C <= bs:
        P = A + torch.eye(C, dtype=A.dtype, device=A.device)
        for _ in range((C - 1).bit_length() - 1):
            A = A @ A
            P = P + P @ A
        return P
    nb = -(-C // bs)
    if C % bs:
        A = torch.nn.functional.pad(A, (0, nb * bs - C, 0, nb * bs - C))
    D = A.unflatten(-2, (nb, bs)).unflatten(-1, (nb, bs)).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
    Td = _wkv7_inv_unit_lower(D)  # [.., nb, bs, bs] diagonal blocks
    T = torch.zeros_like(A)
    T[..., :bs, :bs] = Td[..., 0, :, :]
    for i in range(1, nb):
        rows = slice(i * bs, (i + 1) * bs)
        T[..., rows, : i * bs] = Td[..., i, :, :] @ (A[..., rows, : i * bs] @ T[..., : i * bs, : i * bs])
        T[..., rows, rows] = Td[..., i, :, :]
    return T[..., :C, :C]


def _wkv7_prep(g, r, k, v, a, b, scale: float, mask: torch.Tensor):
    """Everything of a group of chunks that does not depend on the state (README §3): inputs [P, C, D]."""
    P, C, K = g.shape
    # exponents relative to the chunk start (README §3.3): γ inclusive cumsum, γ⁻ = γ - g
    gam = g.cumsum(1)
    e = gam.exp()
    ein = e.reciprocal()
    em = (gam - g).exp()
    left, right = g.new_empty(P, 2 * C, K), g.new_empty(P, 2 * C, K)  # [r̃; ã], [k e^{-γ}; b e^{-γ}]
    torch.mul(r, e, out=left[:, :C])
    if scale != 1.0:
        left[:, :C].mul_(scale)
    torch.mul(a, em, out=left[:, C:])
    torch.mul(k, ein, out=right[:, :C])
    torch.mul(b, ein, out=right[:, C:])
    L = (left @ right.mT).masked_fill_(mask, 0)  # [[A_qk, A_qb], [A_ak, A_ab]]
    Tm = _wkv7_inv_unit_lower(L[:, C:, C:])
    WU0 = Tm @ torch.cat([left[:, C:], L[:, C:, :C] @ v], -1)  # [W | U⁰]
    return e, ein, em, e[:, -1:, :], left, right, L, Tm, WU0


def _wkv7_fwd(xs, h_in, sizes: list[int], scale: float, mask: torch.Tensor):
    """One group of chunk steps: xs = (g, r, k, v, a, b) [P, C, D] (P = chunk-heads, step-major, `sizes` per
    step), h_in [>= sizes[0], K, V]. Returns O [P, C, V], h_out (like h_in: each slot's state after its last
    step here) and, for the backward, (Hp [P, K, V]: the state entering each chunk, U, _wkv7_prep's)."""
    g, v = xs[0], xs[3]
    P, C, K, V = g.shape[0], g.shape[1], g.shape[2], v.shape[2]
    prep = _wkv7_prep(*xs, scale, mask)
    e, ein, em, eC, left, right, L, Tm, WU0 = prep
    W, U0 = WU0[..., :K], WU0[..., K:]
    hat = right * eC  # [K̂; B̂] = [k; b] e^{γ_C - γ}
    KV = hat[:, :C].mT @ v
    U, Hp = torch.empty_like(U0), g.new_empty(P + sizes[0], K, V)
    Hp[: sizes[0]].copy_(h_in[: sizes[0]])
    h_out = torch.empty_like(h_in)
    if h_in.shape[0] > sizes[0]:  # empty sequences (first group only): final state = initial state
        h_out[sizes[0] :].copy_(h_in[sizes[0] :])
    lo = 0
    for i, n in enumerate(sizes):
        h, nxt = Hp[lo : lo + n], Hp[lo + n : lo + 2 * n]
        torch.baddbmm(U0[lo : lo + n], W[lo : lo + n], h, out=U[lo : lo + n])
        torch.addcmul(KV[lo : lo + n], eC[lo : lo + n].mT, h, out=nxt)
        nxt.baddbmm_(hat[lo : lo + n, C:].mT, U[lo : lo + n])
        m = sizes[i + 1] if i + 1 < len(sizes) else 0
        if m < n:  # sequences whose last chunk this was (their rows of `nxt` get overwritten next step)
            h_out[m:n].copy_(nxt[m:])
        lo += n
    Hp = Hp[:P]
    O = torch.bmm(left[:, :C], Hp).baddbmm_(L[:, :C, :C], v).baddbmm_(L[:, :C, C:], U)  # R̃h₀+A_qk V+A_qb U
    return O, h_out, (Hp, U, prep)


def _wkv7_bwd(v, Hp, U, prep, dO, dh_out, sizes: list[int], scale: float, mask: torch.Tensor):
    """Gradients of one _wkv7_fwd group (README §4): a reverse state loop, then batched matmuls."""
    C, K = v.shape[1], Hp.shape[1]
    e, ein, em, eC, left, right, L, Tm, WU0 = prep
    dC = eC.mT
    rt, at, kin, bin_ = left[:, :C], left[:, C:], right[:, :C], right[:, C:]
    W = WU0[..., :K]
    dU_loc = L[:, :C, C:].mT @ dO
    dh_O = rt.mT @ dO
    dX, dU = torch.empty_like(Hp), torch.empty_like(U)
    bufs = (torch.empty_like(dh_out), torch.empty_like(dh_out))
    dh = dh_out[: sizes[-1]]
    lo = len(Hp)
    for i in reversed(range(len(sizes))):
        n = sizes[i]
        lo -= n
        if dh.shape[0] < n:  # sequences whose last chunk was step i
            dh = torch.cat([dh, dh_out[dh.shape[0] : n]])
        dX_i, dU_i = dX[lo : lo + n], dU[lo : lo + n]
        torch.mul(dh, dC[lo : lo + n], out=dX_i)
        torch.baddbmm(dU_loc[lo : lo + n], bin_[lo : lo + n], dX_i, out=dU_i)
        dh = torch.baddbmm(dh_O[lo : lo + n], W[lo : lo + n].mT, dU_i, out=bufs[i % 2][:n]).add_(dX_i)
    if dh.shape[0] < dh_out.shape[0]:  # empty sequences: final state = initial state
        dh = torch.cat([dh, dh_out[dh.shape[0] :]])
    VU = torch.cat([v, U], 1)
    Z = VU @ dX.mT  # [v dXᵀ; U dXᵀ]: the state update's share of d(k e^{-γ}), d(b e^{-γ})
    dgC = torch.einsum("pkv,pkv->pk", dX, Hp) + torch.einsum("pck,pck->pk", right, Z)  # the state's own γ_C
    dY = Tm.mT @ torch.cat([dU @ Hp.mT, dU], -1)  # through W = T ã and U⁰ = T A_ak v
    dL = torch.cat([dO @ VU.mT, torch.cat([dY[..., K:] @ v.mT, dY @ WU0.mT], -1)], 1).masked_fill_(mask, 0)
    dleft = dL @ right
    dright = torch.baddbmm(Z, dL.mT, left)
    drt = torch.baddbmm(dleft[:, :C], dO, Hp.mT)
    dat = dleft[:, C:] + dY[..., :K]
    dkin, dbin = dright[:, :C], dright[:, C:]
    dv = torch.baddbmm(L[:, :, :C].mT @ torch.cat([dO, dY[..., K:]], 1), kin, dX)
    dgam = (drt * rt).addcmul_(dat, at).addcmul_(dkin, kin, value=-1).addcmul_(dbin, bin_, value=-1)
    dgam[:, -1] += dgC
    dg = dgam.flip(1).cumsum(1).flip(1) - dat * at
    dr = drt * e if scale == 1.0 else drt * e * scale
    return (dg, dr, dkin * ein, dv, dat * em, dbin * ein), dh


def _wkv7_gather(flat, idx: torch.Tensor, keep: torch.Tensor | None, C: int, cdt: torch.dtype):
    """Rows idx of each [tokens * H, D] input as [P, C, D] in the compute dtype; padding: decay 1, no write"""
    xs = [x.index_select(0, idx).view(-1, C, x.shape[-1]).to(cdt) for x in flat]
    if keep is not None:  # r, a of padding rows reach nothing
        for j in (0, 2, 3, 5):
            xs[j] = torch.where(keep, xs[j], 0)
    return xs


def _wkv7_run(flat, h0, plan, scale: float, mask: torch.Tensor, cdt: torch.dtype, save: bool):
    """Forward over all groups: o [tokens * H, V], final states [N * H, K, V] (sorted slots) and, with `save`,
    _WKV7_SAVED tensors per group for the backward."""
    groups, active, rows, valid, H, C = plan
    o = flat[3].new_empty(flat[3].shape)
    hT = torch.empty_like(h0)
    h, saved = h0, []
    for n0, n1, r0, r1 in groups:
        idx = rows[r0:r1]
        keep = None if valid is None else valid[r0:r1].view(-1, C, 1)
        xs = _wkv7_gather(flat, idx, keep, C, cdt)
        O, h_out, (Hp, U, prep) = _wkv7_fwd(xs, h, [n * H for n in active[n0:n1]], scale, mask)
        if save:
            saved.extend((xs[3], Hp, U, *prep))
        O = O.view(-1, O.shape[-1]).to(o.dtype)
        if keep is not None:
            idx, O = idx[keep.flatten()], O[keep.flatten()]
        o.index_copy_(0, idx, O)
        nxt = active[n1] * H if n1 < len(active) else 0
        hT[nxt : h.shape[0]] = h_out[nxt:]
        h = h_out[:nxt]
    return o, hT, saved


class _Wkv7Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, r, k, v, a, b, h0, plan, scale, mask, cdt):
        o, hT, saved = _wkv7_run((w, r, k, v, a, b), h0, plan, scale, mask, cdt, save=True)
        ctx.save_for_backward(*saved)  # intermediates too, so that checkpointing can drop and recompute them
        ctx.inputs = [(x.shape, x.dtype) for x in (w, r, k, v, a, b)]
        ctx.plan, ctx.scale, ctx.mask, ctx.cdt = plan, scale, mask, cdt
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        with torch.autocast(do.device.type, enabled=False):  # the kernel computes in ctx.cdt, never lower
            return _Wkv7Chunked._backward(ctx, do, dhT)

    @staticmethod
    def _backward(ctx, do, dhT):
        saved = ctx.saved_tensors  # read once: non-reentrant checkpointing allows no second unpack
        groups, active, rows, valid, H, C = ctx.plan
        # every token row of every gradient is written exactly once below
        grads = [do.new_empty(shape, dtype=dtype) for shape, dtype in ctx.inputs]
        dh = None  # gradient of the state entering the group after this one
        for gi in reversed(range(len(groups))):
            n0, n1, r0, r1 = groups[gi]
            idx = rows[r0:r1]
            keep = None if valid is None else valid[r0:r1].view(-1, C, 1)
            dO = do.index_select(0, idx).view(-1, C, do.shape[-1]).to(ctx.cdt)
            if keep is not None:
                dO = torch.where(keep, dO, 0)
            n_in = len(dhT) if gi == 0 else active[n0] * H
            dh_out = dhT[:n_in] if dh is None else torch.cat([dh, dhT[len(dh) : n_in]])
            v, Hp, U, *prep = saved[_WKV7_SAVED * gi : _WKV7_SAVED * (gi + 1)]
            gs, dh = _wkv7_bwd(
                v, Hp, U, prep, dO, dh_out, [n * H for n in active[n0:n1]], ctx.scale, ctx.mask
            )
            if keep is not None:
                idx = idx[keep.flatten()]
            for dx, gx in zip(grads, gs, strict=True):
                gx = gx.reshape(-1, gx.shape[-1]).to(dx.dtype)
                dx.index_copy_(0, idx, gx if keep is None else gx[keep.flatten()])
        return (*grads, dh, None, None, None, None)


def wkv7_chunked(
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
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-7 WKV, fla layout: r, w (log-decay), k, a, b [B, T, H, K]; v [B, T, H, V]; states [N, H, K, V].

    Returns (o [B, T, H, V] in v's dtype, final state in fp32 (fp64 for fp64 inputs) or None).
    """
    B, T, H, K = r.shape
    V, dev = v.shape[-1], r.device
    C = int(chunk_size)
    cdt = torch.float64 if any(x.dtype == torch.float64 for x in (r, w, k, v, a, b)) else torch.float32
    offsets = cu_seqlens.tolist() if cu_seqlens is not None else [i * T for i in range(B + 1)]
    active, order, rows, valid, unsort = wkv7_schedule(offsets, C, H, dev)
    N = len(offsets) - 1
    # Steps run in groups of about _WKV7_GROUP_ROWS (chunk, head, position) rows: every intermediate stays
    # small, so it is cache-resident and reuses freed memory instead of page-faulting in fresh allocations.
    groups, n0, r0 = [], 0, 0
    while n0 < len(active):
        n1, r1 = n0, r0
        while n1 < len(active) and (n1 == n0 or r1 - r0 + active[n1] * H * C <= _WKV7_GROUP_ROWS):
            r1 += active[n1] * H * C
            n1 += 1
        groups.append((n0, n1, r0, r1))
        n0, r0 = n1, r1
    plan = (groups, active, rows, valid, H, C)
    above = torch.ones(C, C, dtype=torch.bool, device=dev).triu(1)
    strict = above | torch.eye(C, dtype=torch.bool, device=dev)
    mask = torch.cat([torch.cat([above, above], 1), torch.cat([strict, strict], 1)])  # j > i / j >= i
    if initial_state is None:
        h0 = torch.zeros(N * H, K, V, dtype=cdt, device=dev)
    else:
        h0 = initial_state.to(cdt).index_select(0, order).view(N * H, K, V)
    flat = [x.reshape(-1, x.shape[-1]) for x in (w, r, k, v, a, b)]  # rows = (token, head)
    # autocast off: the kernel computes in cdt (fp32/fp64) whatever the inputs, and writes into preallocated
    # buffers (out=) that an autocast-lowered matmul could not fill
    with torch.autocast(dev.type, enabled=False):
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (*flat, h0)):
            o, hT = _Wkv7Chunked.apply(*flat, h0, plan, scale, mask, cdt)
        else:
            o, hT, _ = _wkv7_run(flat, h0, plan, scale, mask, cdt, save=False)
    final = hT.view(N, H, K, V).index_select(0, unsort) if output_final_state else None
    return o.view(B, T, H, V), final


# </wkv7-chunked>
# fmt: on
# fmt: off
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
# fmt: on


FLA_REQUIRED = ((0, 6, 0), (0, 7))  # [0.6.0, 0.7): 0.4.2-0.5.2 are wrong on the safe-gate path (fla PR #1085)
_FLA_WARNED: set[str] = set()


def _fla_version_problem() -> str | None:
    """Why the installed fla must not be used (None when it is in FLA_REQUIRED or absent)."""
    import importlib.metadata as md

    for dist in ("fla-core", "flash-linear-attention"):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            continue
        release = tuple(int(x) for x in re.findall(r"\d+", version)[:3])
        if FLA_REQUIRED[0] <= release and release[:2] < FLA_REQUIRED[1]:
            return None
        return (
            f"fla {version} is installed but the student needs fla >=0.6.0,<0.7 (0.4.2-0.5.2 give wrong "
            "results on the safe-gate path with several heads): pip install 'fla-core>=0.6.0,<0.7'"
        )
    return None


def _checked_fla(backend: str, load):
    """fla's kernels from `load()` when fla is usable; a wrong version is an error for backend='fla' and a
    one-time warning + the chunked kernel for 'auto'."""
    problem = _fla_version_problem()
    if problem is not None:
        if backend == "fla":
            raise ImportError(problem)
        if problem not in _FLA_WARNED:
            _FLA_WARNED.add(problem)
            logger.warning(problem + "; using the (slow) chunked PyTorch kernel instead")
        return None
    return load()


def _fla_kernels(backend: str = "auto"):
    def load():
        try:  # inside try: transformers' remote-code import scan skips it (fla is optional)
            from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
        except Exception:  # fla raises assorted errors when triton or the driver is missing
            return None
        return chunk_rwkv7, fused_recurrent_rwkv7

    return _checked_fla(backend, load)


_NATIVE_WKV7 = None


def _native_kernel(backend: str):
    """arwkv's C++ CPU kernel (arwkv/ops/wkv7/native.py) when the arwkv package is installed and the kernel
    builds on this machine; None otherwise (the chunked kernel below then runs)."""
    global _NATIVE_WKV7
    if _NATIVE_WKV7 is not None:  # resolved once: a decode step asks once per layer
        return _NATIVE_WKV7
    try:  # inside try: transformers' remote-code import scan skips it (arwkv is optional here)
        from arwkv.ops.wkv7.native import native_problem, wkv7_native
    except ImportError:
        problem = "wkv_backend='native' needs the arwkv package (pip install arwkv)"
    else:
        problem = native_problem()  # builds once per machine; warns once when it cannot
        if problem is None:
            _NATIVE_WKV7 = wkv7_native
            return wkv7_native
    if backend == "native":
        raise ImportError(f"{problem}; or use wkv_backend='chunked'")
    return None


def wkv7(r, w, k, v, a, b, initial_state, cu_seqlens, backend: str, chunk_size: int):
    """The student's WKV call: `wkv7_dispatch` above (the same dispatch as arwkv.ops.wkv7) with this file's
    kernel finders. Decays are clamped to (DECAY_SCALE, 0), so fla may take its safe-gate path; fla picks its
    own chunk length (`chunk_size` is the chunked kernel's). Returns (o in v's dtype, final state fp32)."""
    return wkv7_dispatch(
        r,
        w,
        k,
        v,
        a,
        b,
        1.0,
        initial_state,
        True,
        cu_seqlens,
        backend=backend,
        chunk_size=chunk_size,
        find_fla=_find_fla,
        find_native=_native_kernel,
        safe_lower_bound=DECAY_SCALE,
        max_neg_logdecay=-DECAY_SCALE,  # the clamp bounds it: no reduction over w per call
    )


def _find_fla(backend: str):
    kernels = _fla_kernels(backend)
    if backend == "fla" and kernels is None:
        raise ImportError("wkv_backend='fla' needs flash-linear-attention and CUDA.")
    return kernels


# -----------------------------------------------------------------------------------------------------------
# WKV-6 kernel (the `version: 6` mixer). The block between the markers is a verbatim copy of
# arwkv/ops/wkv6/chunked.py (it uses the wkv7 block's chunk schedule above). fla conventions, argument order
# (r, k, v, w, u): w = log-decay <= 0, u [H, K]; state [B, H, K, V] fp32 (rows = key):
# o_t = (S_{t-1} + diag(u) k_t v_tᵀ)ᵀ r_t, S_t = diag(e^{w_t}) S_{t-1} + k_t v_tᵀ.


# fmt: off
# <wkv6-chunked>
# RWKV-6 WKV, chunked form. Copied from arwkv/ops/wkv6/chunked.py (derivation: arwkv/ops/wkv6/README.md).
# Any log-decay w <= 0 is safe: chunks whose cumulative decay exceeds e^{-40} take the sub-blocked path, whose
# exponentials are all of differences <= 0 (README §2.1).

_WKV6_SUB = 4  # sub-block length of the safe path: exact pairwise decays inside, one reference point between
_WKV6_MAX_EXPONENT = 40.0  # fast path while a chunk's cumulative log-decay stays within e^{±40} (fp32-safe)
_WKV6_GROUP_ROWS = 4096  # (chunk, head, position) rows per step group: intermediates stay cache-resident


def _wkv6_intra_safe(r, k, gam, gm, sub: int) -> torch.Tensor:
    """Strictly lower-triangular A [P, C, C], A_ij = Σ_d r_id k_jd e^{γ⁻_id - γ_jd} (j < i), for any decay.

    Inside a sub-block the exponent is formed pairwise (masked to -inf above the diagonal before `exp`, so
    neither values nor gradients see inf); for earlier sub-blocks both factors are scaled to the first row
    of the query's sub-block, where e^{γ⁻_i - ref} <= 1 and e^{ref - γ_j} <= 1.
    """
    P, C, _ = r.shape
    rows = []
    for lo in range(0, C, sub):
        hi = min(lo + sub, C)
        n = hi - lo
        diff = gm[:, lo:hi, None, :] - gam[:, None, lo:hi, :]  # [P, n, n, K]
        below = torch.ones(n, n, dtype=torch.bool, device=r.device).tril(-1)[None, :, :, None]
        e = torch.where(below, diff, float("-inf")).exp().to(r.dtype)
        diag = (r[:, lo:hi, None, :] * k[:, None, lo:hi, :] * e).sum(-1)  # [P, n, n]
        parts = [diag, r.new_zeros(P, n, C - hi)]
        if lo > 0:
            ref = gm[:, lo : lo + 1]  # = γ at the last row of the previous sub-block
            q = r[:, lo:hi] * (gm[:, lo:hi] - ref).exp().to(r.dtype)
            kk = k[:, :lo] * (ref - gam[:, :lo]).exp().to(r.dtype)
            parts.insert(0, q @ kk.mT)
        rows.append(torch.cat(parts, -1))
    return torch.cat(rows, 1)


def _wkv6_group(r, k, v, g, u, h, sizes: list[int], nxt: int):
    """One group of chunk steps, inputs [P, C, ·] with P = sum(sizes) (chunk, head) rows, step-major.

    h: state entering the group's first step (its first sizes[0] rows are used); nxt: rows that continue
    after the group. Returns (O [P, C, V], state continuing [nxt, K, V], finished states: pieces of rows
    [m, n) in the order the sequences end).
    """
    C = r.shape[1]
    gam = g.cumsum(1)  # inclusive log-decay within the chunk, γ
    if float(-gam[:, -1].detach().min()) <= _WKV6_MAX_EXPONENT:  # factorized: one matmul (README §2.1)
        gm = gam - g  # exclusive, γ⁻: the output reads the state before its own token's decay
        gC = gam[:, -1:]
        rq = r * gm.exp()  # r ⊙ e^{γ⁻} (<= 1 factors): reads the entering state
        ke = k * (-gam).exp()
        kd = ke * gC.exp()  # k ⊙ e^{γ_C - γ}: writes the leaving state
        above = torch.ones(C, C, dtype=torch.bool, device=r.device).triu()
        A = (rq @ ke.mT).masked_fill_(above, 0)
    else:  # strong decays: cumulative sums so large that their differences need fp64 (README §2.1)
        g64 = g.double()
        gam = g64.cumsum(1)
        gm, gC = gam - g64, gam[:, -1:]
        rq = r * gm.exp().to(r.dtype)
        kd = k * (gC - gam).exp().to(r.dtype)
        A = _wkv6_intra_safe(r, k, gam, gm, _WKV6_SUB)
        gC = gC.to(r.dtype)
    bonus = (r * u[:, None] * k).sum(-1, keepdim=True)  # r_i · diag(u) k_i: the current token's own write
    O = torch.baddbmm(bonus * v, A, v)
    KV = torch.bmm(kd.mT.contiguous(), v)  # [P, K, V]; a contiguous first operand is ~1.5x faster on CPU
    eC = gC.exp().mT  # [P, K, 1]
    outs, pieces, lo = [], [], 0
    for i, n in enumerate(sizes):  # the only sequential part
        h_in = h[:n]
        outs.append(torch.baddbmm(O[lo : lo + n], rq[lo : lo + n], h_in))  # + (r ⊙ e^{γ⁻}) h_entering
        h = torch.addcmul(KV[lo : lo + n], eC[lo : lo + n], h_in)  # e^{γ_C} ⊙ h + Σ_j (k_j e^{γ_C-γ_j}) v_jᵀ
        m = sizes[i + 1] if i + 1 < len(sizes) else nxt
        if m < n:  # sequences whose last chunk this was
            pieces.append(h[m:])
        lo += n
    return torch.cat(outs), h[:nxt], pieces


def _wkv6_run(r, k, v, w, u, h0, plan, scale: float, cdt: torch.dtype):
    """All step groups: o [B*T*H, V] in v's dtype and the final states [N*H, K, V] in sorted order."""
    active, rows, valid, H, C, V = plan
    flat = [x.reshape(-1, x.shape[-1]) for x in (r, k, v, w)]  # rows = (token, head)
    uc = u.to(cdt)
    o = flat[2].new_empty(flat[2].shape[0], V)  # every (token, head) row is written exactly once below
    h, pieces, n0, r0 = h0, [], 0, 0
    while n0 < len(active):
        n1, r1 = n0, r0
        while n1 < len(active) and (n1 == n0 or r1 - r0 + active[n1] * H * C <= _WKV6_GROUP_ROWS):
            r1 += active[n1] * H * C
            n1 += 1
        P = (r1 - r0) // C
        r_, k_, v_, g = (x.index_select(0, rows[r0:r1]).view(P, C, -1).to(cdt) for x in flat)
        if valid is not None:  # padding rows: decay 1, no write
            keep = valid[r0:r1].view(P, C, 1)
            k_, g = torch.where(keep, k_, 0), torch.where(keep, g, 0)
        if scale != 1.0:
            r_ = r_ * scale
        sizes = [n * H for n in active[n0:n1]]
        nxt = active[n1] * H if n1 < len(active) else 0
        O, h, done = _wkv6_group(r_, k_, v_, g, uc.repeat(P // H, 1), h, sizes, nxt)
        O, idx = O.reshape(-1, V).to(o.dtype), rows[r0:r1]
        if valid is not None:
            O, idx = O[valid[r0:r1]], idx[valid[r0:r1]]
        o.index_copy_(0, idx, O)  # in place, also under autograd: no concatenation of all groups
        pieces.extend(done)
        n0, r0 = n1, r1
    return o, torch.cat([*reversed(pieces), h0[active[0] * H :]])  # + empty sequences: final = initial


class _Wkv6Chunked(torch.autograd.Function):
    """Saves only the inputs; the backward recomputes the forward under autograd (exact, and the memory of a
    checkpointed layer), always in the kernel's own dtype: an enclosing autocast never lowers it."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, h0, plan, scale, cdt):
        ctx.save_for_backward(r, k, v, w, u, h0)
        ctx.plan, ctx.scale, ctx.cdt = plan, scale, cdt
        return _wkv6_run(r, k, v, w, u, h0, plan, scale, cdt)

    @staticmethod
    def backward(ctx, do, dhT):
        inputs = [
            x.detach().requires_grad_(need)
            for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:6], strict=True)
        ]
        wanted = [x for x in inputs if x.requires_grad]
        with torch.enable_grad(), torch.autocast(do.device.type, enabled=False):
            o, hT = _wkv6_run(*inputs, ctx.plan, ctx.scale, ctx.cdt)
            got = iter(torch.autograd.grad((o, hT), wanted, (do, dhT), allow_unused=True))
        grads = [next(got) if x.requires_grad else None for x in inputs]
        return (*grads, None, None, None)


def wkv6_chunked(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-6 WKV, fla layout: r, k, w (log-decay) [B, T, H, K]; v [B, T, H, V]; u [H, K]; state [N, H, K, V].

    Returns (o [B, T, H, V] in v's dtype, final state in fp32 (fp64 for fp64 inputs) or None).
    """
    B, T, H, K = r.shape
    V, dev, C = v.shape[-1], r.device, int(chunk_size)
    cdt = torch.float64 if any(x.dtype == torch.float64 for x in (r, k, v, w, u)) else torch.float32
    offsets = cu_seqlens.tolist() if cu_seqlens is not None else [i * T for i in range(B + 1)]
    active, order, rows, valid, unsort = wkv7_schedule(offsets, C, H, dev)
    N = len(offsets) - 1
    plan = (active, rows, valid, H, C, V)
    with torch.autocast(dev.type, enabled=False):  # computes in cdt whatever an enclosing autocast says
        if initial_state is None:
            h0 = torch.zeros(N * H, K, V, dtype=cdt, device=dev)
        else:
            h0 = initial_state.to(cdt).index_select(0, order).reshape(N * H, K, V)
        xs = (r, k, v, w, u, h0)
        if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
            o, hT = _Wkv6Chunked.apply(*xs, plan, scale, cdt)
        else:
            o, hT = _wkv6_run(*xs, plan, scale, cdt)
    final = hT.view(N, H, K, V).index_select(0, unsort) if output_final_state else None
    return o.view(B, T, H, V), final


def wkv6_step(r, k, v, w, u, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (decode): r, k, w [B, 1, H, K], v [B, 1, H, V], u [H, K], state [B, H, K, V] fp32 (or fp64).
    Returns (o [B, 1, H, V] in the state's dtype, new state)."""
    r, k, v, w = (t[:, 0].to(state.dtype) for t in (r, k, v, w))
    kv = k[..., None] * v[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", state + u.to(state.dtype)[..., None] * kv, r)
    return o[:, None], state * w.exp()[..., None] + kv


# </wkv6-chunked>
# fmt: on


def _fla_kernels6(backend: str = "auto"):
    def load():
        try:  # inside try: transformers' remote-code import scan skips it (fla is optional)
            from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
        except Exception:  # fla raises assorted errors when triton or the driver is missing
            return None
        return chunk_rwkv6, fused_recurrent_rwkv6

    return _checked_fla(backend, load)


def wkv6(r, k, v, w, u, initial_state, cu_seqlens, backend: str, chunk_size: int):
    """The one place an RWKV-6 kernel is chosen. Returns (o [B, T, H, V] in v's dtype, final state fp32)."""
    kernels = _fla_kernels6(backend) if backend == "fla" or (backend == "auto" and r.is_cuda) else None
    if backend == "fla" and kernels is None:
        raise ImportError("wkv_backend='fla' needs flash-linear-attention and CUDA.")
    if kernels is not None:
        chunk, recurrent = kernels
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (r, k, v, w, u))
        fn = recurrent if not needs_grad and r.shape[1] < 16 and cu_seqlens is None else chunk
        o, state = fn(
            r,
            k,
            v,
            w,
            u,
            scale=1.0,
            initial_state=initial_state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
        )
        return o.to(v.dtype), state
    if r.shape[1] == 1 and cu_seqlens is None:
        sdt = torch.float64 if r.dtype == torch.float64 else torch.float32
        if initial_state is None:
            initial_state = torch.zeros(*k.shape[::2], k.shape[-1], v.shape[-1], device=k.device, dtype=sdt)
        o, state = wkv6_step(r, k, v, w, u, initial_state.to(sdt))
        return o.to(v.dtype), state
    return wkv6_chunked(
        r,
        k,
        v,
        w,
        u,
        scale=1.0,
        initial_state=initial_state,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )


# -----------------------------------------------------------------------------------------------------------
# Teacher modules


# -----------------------------------------------------------------------------------------------------------
# Local attention: the teacher's attention over a sliding window + sinks, beside the RWKV state
# (`config.local_window`). The block between the markers is a verbatim copy of arwkv/ops/local_attention.py.

# <local-attention>
# Sink + sliding-window attention. Copied from arwkv/ops/local_attention.py into the student's modeling file.
LOCAL_BLOCK = 256  # queries per block


def allowed_keys(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_rank: torch.Tensor,
    k_real: torch.Tensor,
    window: int,
    sinks: int,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Q, K] bool mask. q_pos [Q], k_pos [K] (long); k_rank / k_real / k_seg [B, K]; q_seg [B, Q].

    A key at the query's own position is always allowed, so a padding query never sees an empty row.
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    recent = (q_pos[:, None] - k_pos[None, :]) < window
    sink = (k_rank < sinks) & k_real
    allowed = causal[None] & (recent[None] | sink[:, None, :]) & k_real[:, None, :]
    if q_seg is not None and k_seg is not None:
        allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])
    return allowed | (k_pos[None, :] == q_pos[:, None])[None]


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_rank: torch.Tensor,
    k_real: torch.Tensor,
    window: int,
    sinks: int,
    scale: float | None = None,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, T, D]; k, v [B, Hkv, S, D] (GQA: Hq a multiple of Hkv); q_pos increasing -> [B, Hq, T, D]"""
    T = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    any_sink = ((k_rank < sinks) & k_real).any(0)  # [S]: a sink of some row
    out = q.new_empty(q.shape)
    for q0 in range(0, T, LOCAL_BLOCK):
        q1 = min(q0 + LOCAL_BLOCK, T)
        lo, hi = q_pos[q0] - window + 1, q_pos[q1 - 1]
        keys = (((k_pos >= lo) | any_sink) & (k_pos <= hi)).nonzero().squeeze(-1)
        mask = allowed_keys(
            q_pos[q0:q1],
            k_pos[keys],
            k_rank[:, keys],
            k_real[:, keys],
            window,
            sinks,
            q_seg[:, q0:q1] if q_seg is not None else None,
            k_seg[:, keys] if k_seg is not None else None,
        )
        out[:, :, q0:q1] = F.scaled_dot_product_attention(
            q[:, :, q0:q1], k[:, :, keys], v[:, :, keys], attn_mask=mask[:, None], scale=scale
        )
    return out


# </local-attention>


LOCAL_ATTENTION = "arwkv_local_window"  # attention-interface name the mixers' local branch dispatches to


def _local_attention_interface(module, query, key, value, attention_mask, scaling=None, local=None, **kwargs):
    """transformers attention-interface entry: the teacher's attention module calls it with its q/k/v after
    RoPE; the mixer passes the key positions / ranks / segments in `local` (the 4D mask is unused)."""
    window = module.local_window
    if kwargs.get("sliding_window"):  # a teacher that already slides (Mistral) keeps the tighter window
        window = min(window, int(kwargs["sliding_window"]))
    out = sink_window_attention(
        query, key, value, window=window, sinks=module.local_sinks, scale=scaling, **local
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(LOCAL_ATTENTION, _local_attention_interface)


def teacher_config_from_dict(teacher_config: dict[str, Any]) -> PreTrainedConfig:
    """The teacher's config object from its `to_dict()`."""
    model_type = teacher_config.get("model_type")
    if model_type not in TEACHER_FAMILIES:
        raise ValueError(
            f"Teacher model_type {model_type!r} is not supported; supported: {sorted(TEACHER_FAMILIES)}. "
            "A new family needs a pre-norm decoder with q/k/v/o projections and an entry in TEACHER_FAMILIES."
        )
    return CONFIG_MAPPING[model_type].from_dict(teacher_config)


def teacher_modules(model_type: str) -> SimpleNamespace:
    """The teacher family's own RMSNorm, MLP, attention and rotary classes, looked up in transformers."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = TEACHER_FAMILIES[model_type]
    return SimpleNamespace(
        **{
            name: getattr(module, prefix + suffix)
            for name, suffix in (
                ("norm", "RMSNorm"),
                ("mlp", "MLP"),
                ("attention", "Attention"),
                ("rotary", "RotaryEmbedding"),
            )
        }
    )


def default_lora_ranks(hidden_size: int) -> dict[str, int]:
    """Size-based LoRA ranks of current RWKV-7 (rwkv7-operator.md §2.2): max(32, round(f·√C / 32)·32)."""
    size = lambda f: max(32, round(f * math.sqrt(hidden_size) / 32) * 32)
    return {"w": size(2.5), "a": size(2.5), "v": size(1.7), "g": size(5.0)}


def default_lora_ranks6(hidden_size: int) -> dict[str, int]:
    """RWKV-6's LoRA ranks (BlinkDL's x060): decay 64 and token-shift mix 32, doubled from width 4096 up."""
    big = hidden_size >= 4096
    return {"w": 128 if big else 64, "mix": 64 if big else 32}


# -----------------------------------------------------------------------------------------------------------
# Token shift


def token_shift(
    x: torch.Tensor, prev: torch.Tensor | None, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous token's x at every position, and the new carried state (x of the last real token).

    prev: carried state [B, C] (one row per sequence with cu_seqlens), None = zeros.
    mask: [B, T] bool, False = padding; padded tokens are skipped (a token sees the last real one before it).
    cu_seqlens: packed sequences (B = 1); each starts from its own row of `prev`.
    """
    B, T, C = x.shape
    rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
    prev = x.new_zeros(rows, C) if prev is None else prev.to(x.dtype)
    if cu_seqlens is not None:
        starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
        nonempty = ends > starts
        shifted = torch.cat([x.new_zeros(1, 1, C), x[:, :-1]], dim=1)
        shifted[0, starts[nonempty]] = prev[nonempty]
        last = x[0, (ends - 1).clamp(min=0)]
        return shifted, torch.where(nonempty[:, None], last, prev)
    if mask is None:
        return torch.cat([prev[:, None], x[:, :-1]], dim=1), x[:, -1]
    positions = torch.arange(T, device=x.device).expand(B, T)
    last_real = torch.where(mask, positions, -1).cummax(dim=1).values  # last real index <= t
    before = torch.cat([last_real.new_full((B, 1), -1), last_real[:, :-1]], dim=1)  # last real index < t
    padded = torch.cat([prev[:, None], x], dim=1)  # index i + 1 holds x_i, index 0 the carried state
    shifted = padded.gather(1, (before + 1)[..., None].expand(B, T, C))
    return shifted, padded[torch.arange(B, device=x.device), last_real[:, -1] + 1]


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips a no-op dispatch (many per decode step)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _guarded(t: torch.Tensor) -> bool:
    # transformers marks tensors loaded from a checkpoint; initialization must not overwrite them
    return getattr(t, "_is_hf_initialized", False)


def _init_copy(t: torch.Tensor, value: torch.Tensor | float) -> None:
    if not _guarded(t):
        with torch.no_grad():
            t.copy_(value if isinstance(value, torch.Tensor) else torch.full_like(t, value))


def _init_orthogonal(t: torch.Tensor, gain: float) -> None:
    if not _guarded(t):
        with torch.no_grad():
            if gain == 0:
                t.zero_()
            else:
                nn.init.orthogonal_(t, gain=gain)


# -----------------------------------------------------------------------------------------------------------
# Linear layers. A decode step reads every weight once per token; with bf16 weights on CPU, PyTorch's matmul
# at a few rows runs at about half its fp32 speed (no gain from half the bytes), so these rows go through
# arwkv's native kernel (arwkv/ops/linear, same result to fp32 rounding) when the arwkv package is installed.

_NATIVE_LINEAR: Any = None


def _native_linear():
    """(linear_bf16, matmul_bf16, max rows) from arwkv/ops/linear if installed and built here, else False."""
    global _NATIVE_LINEAR
    if _NATIVE_LINEAR is None:
        try:  # inside try: transformers' remote-code import scan skips it (arwkv is optional here)
            from arwkv.ops.linear import MAX_ROWS, linear_bf16, matmul_bf16, native_linear_available
        except ImportError:
            _NATIVE_LINEAR = False
        else:
            _NATIVE_LINEAR = (linear_bf16, matmul_bf16, MAX_ROWS) if native_linear_available() else False
    return _NATIVE_LINEAR


def _decode_kernels(x: torch.Tensor, w: torch.Tensor):
    """The native kernels when x @ w is a bf16 CPU decode product (few rows, no autograd); else None."""
    if w.dtype != torch.bfloat16 or w.is_cuda or x.numel() > 64 * x.shape[-1]:
        return None
    native = _native_linear()
    if not native or x.numel() > native[2] * x.shape[-1]:
        return None
    if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        return None
    return native


def _matmul(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ w (a mixer's LoRA matrix [in, out]), computed in `dtype` when given."""
    native = _decode_kernels(x, w)
    if native:
        return native[1](x, w, dtype)
    return x @ w if dtype is None else _to(x, dtype) @ _to(w, dtype)


class ArwkvLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose bf16 CPU decode rows use the native kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = _decode_kernels(x, self.weight)
        if native:
            return native[0](x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_arwkv_linears(module: nn.Module) -> None:
    """Make the plain nn.Linear layers of a teacher module (MLP, softmax attention) ArwkvLinear, in place."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = ArwkvLinear


# -----------------------------------------------------------------------------------------------------------
# RWKV-7 time mixing


class ArwkvTimeMix(nn.Module):
    """RWKV-7 time mixing in place of a teacher's self-attention (method.md §2, rwkv7-operator.md §2.1).

    Input x is the layer's `input_layernorm` output [B, T, C]; r/k/v have width D = teacher heads × head_dim,
    split into H = D / N WKV heads of size N. Parameter names follow the published ARWKV checkpoints.
    """

    version = 7

    def __init__(
        self,
        config: ArwkvConfig,
        layer_idx: int,
        norm_class: type[nn.Module] | None = None,
        local_attention: nn.Module | None = None,
    ):
        super().__init__()
        C, D, N = config.hidden_size, config.mixer_dim, config.wkv_head_size
        self.layer_idx, self.num_layers = layer_idx, config.num_hidden_layers
        self.hidden_size, self.dim, self.head_size, self.num_heads = C, D, N, D // N
        self.teacher_head_dim = config.teacher_head_dim
        self.is_first = layer_idx == config.rwkv_layers[0]  # stores v_first for the value residual
        self.use_token_shift, self.use_rope = config.use_token_shift, config.use_rope
        self.backend, self.chunk_size = config.wkv_backend, config.wkv_chunk_size
        ranks = {**default_lora_ranks(C), **config.lora_ranks}

        if self.use_token_shift:
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
                setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.w0 = nn.Parameter(torch.zeros(1, 1, D))
        self.w1 = nn.Parameter(torch.zeros(C, ranks["w"]))
        self.w2 = nn.Parameter(torch.zeros(ranks["w"], D))
        self.a0 = nn.Parameter(torch.zeros(1, 1, D))
        self.a1 = nn.Parameter(torch.zeros(C, ranks["a"]))
        self.a2 = nn.Parameter(torch.zeros(ranks["a"], D))
        # kept in the first layer too (unused there), as in the published checkpoints
        self.v0 = nn.Parameter(torch.zeros(1, 1, D))
        self.v1 = nn.Parameter(torch.zeros(C, ranks["v"]))
        self.v2 = nn.Parameter(torch.zeros(ranks["v"], D))
        if config.use_gate:
            self.g1 = nn.Parameter(torch.zeros(C, ranks["g"]))
            self.g2 = nn.Parameter(torch.zeros(ranks["g"], D))
        self.k_k = nn.Parameter(torch.zeros(1, 1, D))
        self.k_a = nn.Parameter(torch.zeros(1, 1, D))
        self.r_k = nn.Parameter(torch.zeros(self.num_heads, N))

        self.receptance = ArwkvLinear(C, D, bias=config.rkv_bias)
        self.key = ArwkvLinear(C, D, bias=config.rkv_bias)
        self.value = ArwkvLinear(C, D, bias=config.rkv_bias)
        self.output = ArwkvLinear(D, C, bias=config.output_bias)
        # "!!! notice eps value !!!" in BlinkDL's code: 1e-5 · head size
        self.ln_x = nn.GroupNorm(self.num_heads, D, eps=1e-5 * N) if config.use_group_norm else None
        if config.use_qk_norm:
            if norm_class is None:
                raise ValueError("use_qk_norm needs the teacher's RMSNorm class.")
            eps = config.rms_norm_eps
            self.r_norm = norm_class(self.teacher_head_dim, eps=eps)
            self.k_norm = norm_class(self.teacher_head_dim, eps=eps)
        else:
            self.r_norm = self.k_norm = None
        # Local branch (config.local_window): the teacher's attention over window + sinks; the RWKV output is
        # added to it through a per-channel gain that starts at 0: the untrained hybrid is the SWA baseline.
        self.local_attn = local_attention
        if local_attention is not None:
            self.state_gain = nn.Parameter(torch.zeros(C))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BlinkDL's RWKV-7 init (rwkv7-operator.md §2.3); tensors loaded from a checkpoint are kept."""
        C, D, N, l, L = self.hidden_size, self.dim, self.head_size, self.layer_idx, self.num_layers
        r01 = l / (L - 1) if L > 1 else 0.0
        r10 = 1.0 - l / L
        ddd = torch.arange(C, dtype=torch.float32) / C
        if self.use_token_shift:
            for name, p in (
                ("x_r", 0.2),
                ("x_w", 0.9),
                ("x_k", 0.7),
                ("x_v", 0.7),
                ("x_a", 0.9),
                ("x_g", 0.2),
            ):
                _init_copy(getattr(self, name), (1.0 - ddd.pow(p * r10)).view(1, 1, C))
        n = torch.arange(D, dtype=torch.float32)
        lin = n / max(D - 1, 1) - 0.5
        z = ((n % N) - (N - 1) / 2) / max((N - 1) / 2, 1e-6)
        zig = z * z.abs()
        www = -6 + 6 * (n / max(D - 1, 1)).pow(1 + r01**0.3)
        _init_copy(self.w0, (www + 0.5 + 2.5 * zig).view(1, 1, D))
        _init_copy(self.a0, (-0.19 + 0.3 * zig + 0.4 * lin).view(1, 1, D))
        _init_copy(self.v0, (0.73 - 0.4 * lin).view(1, 1, D))
        _init_copy(self.k_k, (0.71 - 0.1 * lin).view(1, 1, D))
        _init_copy(self.k_a, 1.02)
        _init_copy(self.r_k, -0.04)
        for first, second in (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2")):
            if hasattr(self, first):
                _init_copy(getattr(self, first), 0.0)
                _init_orthogonal(getattr(self, second), 0.1)
        _init_orthogonal(self.receptance.weight, 1.0)
        _init_orthogonal(self.key.weight, 0.1)
        _init_orthogonal(self.value.weight, 1.0)
        _init_orthogonal(self.output.weight, 0.0)
        for lin_layer in (self.receptance, self.key, self.value, self.output):
            if lin_layer.bias is not None:
                _init_copy(lin_layer.bias, 0.0)
        if self.ln_x is not None:
            _init_copy(self.ln_x.weight, ((1 + l) / L) ** 0.7)
            _init_copy(self.ln_x.bias, 0.0)
        for norm in (self.r_norm, self.k_norm):
            if norm is not None:
                _init_copy(norm.weight, 1.0)
        if self.local_attn is not None:
            _init_copy(self.state_gain, 0.0)

    def _per_teacher_head(self, fn, x: torch.Tensor) -> torch.Tensor:
        # q/k norms and RoPE act on the teacher's head layout, whatever the WKV head size
        return fn(x.view(*x.shape[:-1], -1, self.teacher_head_dim)).flatten(-2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        layer_state: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        local_state: LocalWindowState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, torch.Tensor]]:
        """Mix [B, T, C] -> [B, T, C].

        v_first: the first RWKV layer's values [B, T, D] (None in that layer, required in the others).
        attention_mask: [B, T], 1 = token, 0 = padding (padding leaves the state and the shift untouched).
        layer_state: (shift [B, C], wkv [B, H, N, N] fp32) carried from earlier tokens; None = fresh.
        cu_seqlens: int64 [S + 1] offsets of packed sequences (B = 1); states then have S rows.
        position_embeddings: the teacher's (cos, sin), needed when use_rope or with a local branch.
        local_state: the local branch's keys/values from earlier tokens (generation); None = fresh.
        Returns (output, v_first, (shift, wkv)) — gradients flow through v_first (not detached).
        """
        x = hidden_states
        B, T, _ = x.shape
        H, N = self.num_heads, self.head_size
        shift_state, wkv_state = layer_state if layer_state is not None else (None, None)
        mask = attention_mask.bool() if attention_mask is not None else None

        if self.use_token_shift:
            prev, new_shift = token_shift(x, shift_state, mask, cu_seqlens)
            xx = prev - x
            xr, xw, xk, xv, xa, xg = (
                x + xx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
            )
        else:
            new_shift = None
            xr = xw = xk = xv = xa = xg = x

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        if self.r_norm is not None:
            r, k = self._per_teacher_head(self.r_norm, r), self._per_teacher_head(self.k_norm, k)
        if self.use_rope:
            cos, sin = (t.unsqueeze(-2) for t in position_embeddings)
            rope = lambda t: t * cos + rotate_half(t) * sin
            r, k = self._per_teacher_head(rope, r), self._per_teacher_head(rope, k)
        # decay in fp32 log space: near-1 decays would round to 1 in bf16 (rwkv7-operator.md §5.3)
        f32 = torch.promote_types(xw.dtype, torch.float32)  # fp32, or fp64 in reference tests
        log_w = DECAY_SCALE * torch.sigmoid(
            _to(self.w0, f32) + _matmul(torch.tanh(_matmul(xw, self.w1, f32)), self.w2, f32)
        )
        if self.is_first:
            v_first = v
        elif v_first is None:
            raise ValueError(f"layer {self.layer_idx}: v_first from the first RWKV layer is required.")
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + _matmul(_matmul(xv, self.v1), self.v2))
        eta = torch.sigmoid(self.a0 + _matmul(_matmul(xa, self.a1), self.a2))  # in-context learning rate
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)  # removal key κ̂
        k = k * (1 + (eta - 1) * self.k_a)  # replacement key k̃

        rh, kh, vh = r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N)
        inputs = [rh, log_w.view(B, T, H, N), kh, vh, -kk, kk * eta.view(B, T, H, N)]
        if mask is not None:  # padded tokens: no decay, no write, no removal (`where`: pads may hold inf)
            keep = mask[:, :, None, None]
            inputs = [torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in inputs]
        o, new_wkv = wkv7(*inputs, wkv_state, cu_seqlens, self.backend, self.chunk_size)
        o = o.reshape(B, T, -1)
        if self.ln_x is not None:
            o = self.ln_x(o.reshape(B * T, -1)).view(B, T, -1)
        bonus = (rh * kh * self.r_k).sum(-1, keepdim=True) * vh  # uses k̃ and the residual-mixed v
        o = o + bonus.reshape(B, T, -1)
        if hasattr(self, "g1"):
            o = o * _matmul(torch.sigmoid(_matmul(xg, self.g1)), self.g2)
        out = self.output(o)
        if self.local_attn is not None:
            local = self._local(x, mask, cu_seqlens, position_embeddings, local_state)
            out = local + out * self.state_gain
        return out, v_first, (new_shift, new_wkv)

    def _local(
        self, x, mask, cu_seqlens, position_embeddings, state: LocalWindowState | None
    ) -> torch.Tensor:
        """The teacher's attention over the last `local_window` positions + `local_sinks` first tokens."""
        B, T, _ = x.shape
        idx = torch.arange(T, device=x.device)
        if cu_seqlens is not None:  # packed documents in one row: attend within each document only
            if state is not None:
                raise ValueError(
                    "packed documents cannot carry a local-window state; pass an attention_mask."
                )
            seg = (torch.searchsorted(cu_seqlens, idx, right=True) - 1)[None]
            rank = idx[None] - cu_seqlens[seg]
            real = torch.ones(1, T, dtype=torch.bool, device=x.device)
            spec = dict(q_pos=idx, k_pos=idx, k_rank=rank, k_real=real, q_seg=seg, k_seg=seg)
        else:
            real = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            if state is None:
                spec = dict(q_pos=idx, k_pos=idx, k_rank=real.long().cumsum(-1) - 1, k_real=real)
            else:
                spec = state.extend(real)
        out, _ = self.local_attn(
            hidden_states=x,
            position_embeddings=position_embeddings,
            attention_mask=None,
            cache=state,
            local=spec,
        )
        if state is not None:
            state.crop()
        return out


# -----------------------------------------------------------------------------------------------------------
# RWKV-6 time mixing (`version: 6`)

# log-decay -exp(w_raw): capped so that it stays finite (e^{-e^{10}} is already 0 in any float)
W6_RAW_MAX = 10.0
MIX6 = ("w", "k", "v", "r", "g")  # order of the five data-dependent token-shift mixes (BlinkDL's x060)


class ArwkvTimeMix6(ArwkvTimeMix):
    """RWKV-6 ("Finch") time mixing in place of a teacher's self-attention: data-dependent token shift
    (ddlerp, a LoRA of five mixes), decay LoRA, bonus u, per-head GroupNorm, SiLU output gate
    (arwkv/ops/wkv6/README.md). Parameter names follow BlinkDL's RWKV-6 checkpoints (`time_maa_*`,
    `time_decay*`, `time_faaaa`). Same call signature and state as `ArwkvTimeMix` (no value residual:
    v_first passes through untouched); teacher-layout helpers (q/k norms, RoPE, local branch) are shared.

    `config.rwkv6_variant == "qrwkv"` is the QRWKV6 / RAD-RWKV6 form (llama.cpp's `rwkv6qwen2`): no bonus,
    k scaled by (1 - decay), a sigmoid gate, no GroupNorm, and the state read after this token's write,
    o_t = N^-1/2 r_t·h_t with h_t = diag(decay_t) h_{t-1} + k_t v_tᵀ. That is the RWKV-6 operator with
    r_t·decay_t and no bonus, plus the current token's own term (r_t·k_t) v_t, so one kernel serves both.
    """

    version = 6

    def __init__(
        self,
        config: ArwkvConfig,
        layer_idx: int,
        norm_class: type[nn.Module] | None = None,
        local_attention: nn.Module | None = None,
    ):
        nn.Module.__init__(self)
        C, D, N = config.hidden_size, config.mixer_dim, config.wkv_head_size
        self.layer_idx, self.num_layers = layer_idx, config.num_hidden_layers
        self.hidden_size, self.dim, self.head_size, self.num_heads = C, D, N, D // N
        self.teacher_head_dim = config.teacher_head_dim
        self.is_first = False  # no value residual in RWKV-6
        self.use_token_shift, self.use_rope = config.use_token_shift, config.use_rope
        self.backend, self.chunk_size = config.wkv_backend, config.wkv_chunk_size
        ranks = {**default_lora_ranks6(C), **config.lora_ranks}

        if self.use_token_shift:
            for name in ("x", *MIX6):
                setattr(self, f"time_maa_{name}", nn.Parameter(torch.zeros(1, 1, C)))
            self.time_maa_w1 = nn.Parameter(torch.zeros(C, len(MIX6) * ranks["mix"]))
            self.time_maa_w2 = nn.Parameter(torch.zeros(len(MIX6), ranks["mix"], C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, D))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, ranks["w"]))
        self.time_decay_w2 = nn.Parameter(torch.zeros(ranks["w"], D))
        self.qrwkv = getattr(config, "rwkv6_variant", "finch") == "qrwkv"
        if not self.qrwkv:
            self.time_faaaa = nn.Parameter(torch.zeros(self.num_heads, N))  # the bonus u

        self.receptance = ArwkvLinear(C, D, bias=config.rkv_bias)
        self.key = ArwkvLinear(C, D, bias=config.rkv_bias)
        self.value = ArwkvLinear(C, D, bias=config.rkv_bias)
        self.gate = ArwkvLinear(C, D, bias=False) if config.use_gate else None
        self.output = ArwkvLinear(D, C, bias=config.output_bias)
        # RWKV-6's GroupNorm eps: 1e-5 * head_size_divisor² with divisor 8, whatever the head size
        self.ln_x = nn.GroupNorm(self.num_heads, D, eps=64e-5) if config.use_group_norm else None
        if config.use_qk_norm:
            if norm_class is None:
                raise ValueError("use_qk_norm needs the teacher's RMSNorm class.")
            self.r_norm = norm_class(self.teacher_head_dim, eps=config.rms_norm_eps)
            self.k_norm = norm_class(self.teacher_head_dim, eps=config.rms_norm_eps)
        else:
            self.r_norm = self.k_norm = None
        self.local_attn = local_attention
        if local_attention is not None:
            self.state_gain = nn.Parameter(torch.zeros(C))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BlinkDL's RWKV-6 init (x060); tensors loaded from a checkpoint are kept."""
        C, D, N, l, L = self.hidden_size, self.dim, self.head_size, self.layer_idx, self.num_layers
        r01 = l / (L - 1) if L > 1 else 0.0
        r10 = 1.0 - l / L
        ddd = torch.arange(C, dtype=torch.float32) / C
        if self.use_token_shift:
            for name, mu in (
                ("x", 1.0 - ddd.pow(r10)),
                ("w", 1.0 - ddd.pow(r10)),
                ("k", 1.0 - ddd.pow(r10)),
                ("v", 1.0 - (ddd.pow(r10) + 0.3 * r01)),
                ("r", 1.0 - ddd.pow(0.5 * r10)),
                ("g", 1.0 - ddd.pow(0.5 * r10)),
            ):
                _init_copy(getattr(self, f"time_maa_{name}"), mu.view(1, 1, C))
            _init_copy(self.time_maa_w1, 0.0)
            if not _guarded(self.time_maa_w2):
                nn.init.uniform_(self.time_maa_w2, -0.01, 0.01)
        n = torch.arange(D, dtype=torch.float32)
        _init_copy(self.time_decay, (-6 + 5 * (n / max(D - 1, 1)).pow(0.7 + 1.3 * r01)).view(1, 1, D))
        _init_copy(self.time_decay_w1, 0.0)
        if not _guarded(self.time_decay_w2):
            nn.init.uniform_(self.time_decay_w2, -0.01, 0.01)
        if not self.qrwkv:
            u = r01 * (1 - n / max(D - 1, 1)) + ((n + 1) % 3 - 1) * 0.1
            _init_copy(self.time_faaaa, u.view(self.num_heads, N))
        _init_orthogonal(self.receptance.weight, 1.0)
        _init_orthogonal(self.key.weight, 0.1)
        _init_orthogonal(self.value.weight, 1.0)
        if self.gate is not None:
            _init_orthogonal(self.gate.weight, 0.1)
        _init_orthogonal(self.output.weight, 0.0)
        for linear in (self.receptance, self.key, self.value, self.output):
            if linear.bias is not None:
                _init_copy(linear.bias, 0.0)
        if self.ln_x is not None:
            _init_copy(self.ln_x.weight, 1.0)
            _init_copy(self.ln_x.bias, 0.0)
        for norm in (self.r_norm, self.k_norm):
            if norm is not None:
                _init_copy(norm.weight, 1.0)
        if self.local_attn is not None:
            _init_copy(self.state_gain, 0.0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        layer_state: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        local_state: LocalWindowState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor | None, torch.Tensor]]:
        """Mix [B, T, C] -> [B, T, C]; arguments and returns as `ArwkvTimeMix.forward` (v_first unused)."""
        x = hidden_states
        B, T, _ = x.shape
        H, N = self.num_heads, self.head_size
        shift_state, wkv_state = layer_state if layer_state is not None else (None, None)
        mask = attention_mask.bool() if attention_mask is not None else None

        if self.use_token_shift:
            prev, new_shift = token_shift(x, shift_state, mask, cu_seqlens)
            xx = prev - x
            # ddlerp: each mix = a static mu plus a low-rank function of the shifted input
            lora = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B, T, len(MIX6), -1)
            dyn = torch.einsum("btfr,frc->fbtc", lora, self.time_maa_w2)
            xw, xk, xv, xr, xg = (
                x + xx * (getattr(self, f"time_maa_{name}") + d) for name, d in zip(MIX6, dyn, strict=True)
            )
        else:
            new_shift = None
            xw = xk = xv = xr = xg = x

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        if self.r_norm is not None:
            r, k = self._per_teacher_head(self.r_norm, r), self._per_teacher_head(self.k_norm, k)
        if self.use_rope:
            cos, sin = (t.unsqueeze(-2) for t in position_embeddings)
            rope = lambda t: t * cos + rotate_half(t) * sin
            r, k = self._per_teacher_head(rope, r), self._per_teacher_head(rope, k)
        # decay in fp32 log space (decays near 1 round to 1 in bf16); decay = exp(-exp(w_raw))
        f32 = torch.promote_types(xw.dtype, torch.float32)
        w_raw = self.time_decay.to(f32) + torch.tanh(xw.to(f32) @ self.time_decay_w1.to(f32)) @ (
            self.time_decay_w2.to(f32)
        )
        log_w = -torch.exp(w_raw.clamp(max=W6_RAW_MAX))

        inputs = [r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), log_w.view(B, T, H, N)]
        if mask is not None:  # padded tokens: no decay, no write (`where`: pads may hold inf)
            keep = mask[:, :, None, None]
            inputs = [torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in inputs]
        if self.qrwkv:
            r, k, v, lw = inputs
            decay = lw.exp()
            r = r * N**-0.5
            k = k * (1 - decay)
            own = (r * k).sum(-1, keepdim=True) * v  # the current token's term, read after its write
            bonus = torch.zeros(H, N, dtype=r.dtype, device=r.device)
            o, new_wkv = wkv6(
                r * decay, k, v, lw, bonus, wkv_state, cu_seqlens, self.backend, self.chunk_size
            )
            o = (o + own.to(o.dtype)).reshape(B, T, -1)
        else:
            o, new_wkv = wkv6(*inputs, self.time_faaaa, wkv_state, cu_seqlens, self.backend, self.chunk_size)
            o = o.reshape(B, T, -1)
        if self.ln_x is not None:
            o = self.ln_x(o.reshape(B * T, -1)).view(B, T, -1)
        if self.gate is not None:
            o = o * (torch.sigmoid if self.qrwkv else F.silu)(self.gate(xg))
        out = self.output(o)
        if self.local_attn is not None:
            local = self._local(x, mask, cu_seqlens, position_embeddings, local_state)
            out = local + out * self.state_gain
        return out, v_first, (new_shift, new_wkv)


# -----------------------------------------------------------------------------------------------------------
# Decoder layer


class ArwkvDecoderLayer(GradientCheckpointingLayer):
    """The teacher's pre-norm block: h += mixer(input_layernorm(h)); h += mlp(post_attention_layernorm(h))."""

    def __init__(
        self, config: ArwkvConfig, teacher_config: PreTrainedConfig, layer_idx: int, modules: SimpleNamespace
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_rwkv = layer_idx not in config.softmax_layers
        self.input_layernorm = modules.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = modules.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = modules.mlp(teacher_config)
        if self.is_rwkv:
            local = None
            if config.local_window:
                local_config = copy.copy(teacher_config)
                local_config._attn_implementation = LOCAL_ATTENTION
                local = modules.attention(local_config, layer_idx)
                local.local_window, local.local_sinks = config.local_window, config.local_sinks
            mixer = ArwkvTimeMix6 if config.version == 6 else ArwkvTimeMix
            self.self_attn = mixer(config, layer_idx, modules.norm, local)
        else:
            self.self_attn = modules.attention(teacher_config, layer_idx)
        layer_types = getattr(teacher_config, "layer_types", None)
        if layer_types is not None:
            self.attention_type = layer_types[layer_idx]
        else:  # Mistral: one sliding window for every layer
            sliding = getattr(teacher_config, "sliding_window", None) is not None
            self.attention_type = "sliding_attention" if sliding else "full_attention"
        use_arwkv_linears(self)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None = None,
        rwkv_mask: torch.Tensor | None = None,
        softmax_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: ArwkvCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        last_segment: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        if self.is_rwkv:
            B, T, C = x.shape
            state_layer = cache.layers[self.layer_idx] if cache is not None else None
            layer_state = state_layer.get_state() if state_layer is not None else None
            local_state = state_layer.local if state_layer is not None else None
            if cu_seqlens is not None:  # packed documents: one row, one sequence per document
                x = x.reshape(1, B * T, C)
                if position_embeddings is not None:
                    position_embeddings = tuple(
                        t.expand(B, T, -1).reshape(1, B * T, -1) for t in position_embeddings
                    )
            out, v_first, (shift, wkv) = self.self_attn(
                x, v_first, rwkv_mask, layer_state, cu_seqlens, position_embeddings, local_state
            )
            out = out.view(B, T, C)
            if cache is not None:
                if last_segment is not None:  # the state a row carries on is its last document's
                    shift = shift[last_segment] if shift is not None else None
                    wkv = wkv[last_segment]
                cache.layers[self.layer_idx].set_state(shift, wkv)
        else:
            out, _ = self.self_attn(
                hidden_states=x,
                position_embeddings=position_embeddings,
                attention_mask=softmax_mask,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        hidden_states = residual + out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, v_first


# -----------------------------------------------------------------------------------------------------------
# Inference state


class LocalWindowState:
    """The local branch's keys and values: each row's first `sinks` real tokens and the last `window`
    positions, so its size stays constant however long the sequence. The teacher's attention module calls
    `update` (the Cache protocol); the mixer calls `extend` before and `crop` after it."""

    TENSORS = ("keys", "values", "rank", "real", "num_real")  # batch-first; `pos` is shared by the rows

    def __init__(self, window: int, sinks: int) -> None:
        self.window, self.sinks = window, sinks
        self.keys = self.values = None  # [B, Hkv, S, D] after RoPE
        self.pos: torch.Tensor | None = None  # [S] position of each kept key
        self.rank: torch.Tensor | None = None  # [B, S] index among the row's real tokens
        self.real: torch.Tensor | None = None  # [B, S] not padding
        self.num_real: torch.Tensor | None = None  # [B] real tokens seen
        self.next_pos = 0

    def extend(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """Positions of the kept + new keys for new tokens with padding mask `real` [B, T]."""
        B, T = real.shape
        q_pos = torch.arange(self.next_pos, self.next_pos + T, device=real.device)
        seen = self.num_real if self.num_real is not None else real.new_zeros(B, dtype=torch.long)
        rank = seen[:, None] + real.long().cumsum(-1) - 1
        if self.pos is not None:
            k_pos, k_rank, k_real = (
                torch.cat([self.pos, q_pos]),
                torch.cat([self.rank, rank], 1),
                torch.cat([self.real, real], 1),
            )
        else:
            k_pos, k_rank, k_real = q_pos, rank, real
        self.pos, self.rank, self.real = k_pos, k_rank, k_real
        self.num_real, self.next_pos = seen + real.long().sum(-1), self.next_pos + T
        return dict(q_pos=q_pos, k_pos=k_pos, k_rank=k_rank, k_real=k_real)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int = 0, **kwargs: Any):
        if self.keys is not None:
            key, value = torch.cat([self.keys, key], 2), torch.cat([self.values, value], 2)
        self.keys, self.values = key, value
        return key, value

    def crop(self) -> None:
        """Drop keys no later token can attend to: keep sinks and the last `window` positions."""
        keep = ((self.rank < self.sinks) & self.real).any(0) | (self.pos > self.next_pos - 1 - self.window)
        if bool(keep.all()):
            return
        idx = keep.nonzero().squeeze(-1)
        self.keys, self.values = self.keys[:, :, idx], self.values[:, :, idx]
        self.pos, self.rank, self.real = self.pos[idx], self.rank[:, idx], self.real[:, idx]

    def apply(self, fn) -> None:
        for name in self.TENSORS:
            t = getattr(self, name)
            setattr(self, name, fn(t) if t is not None else None)

    def reset(self) -> None:
        self.__init__(self.window, self.sinks)


class ArwkvStateLayer:
    """One RWKV layer's state: token-shift vector [B, C] (model dtype) and WKV state [B, H, N, N] fp32, plus
    the local branch's window of keys/values when the mixer has one."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, local_window: int = 0, local_sinks: int = 0) -> None:
        self.shift: torch.Tensor | None = None
        self.wkv: torch.Tensor | None = None
        self.local = LocalWindowState(local_window, local_sinks) if local_window else None

    @property
    def is_initialized(self) -> bool:
        return self.wkv is not None

    def get_state(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        return (self.shift, self.wkv) if self.wkv is not None else None

    def set_state(self, shift: torch.Tensor | None, wkv: torch.Tensor) -> None:
        self.shift, self.wkv = shift, wkv

    def _apply(self, fn) -> None:
        self.shift = fn(self.shift) if self.shift is not None else None
        self.wkv = fn(self.wkv) if self.wkv is not None else None
        if self.local is not None:
            self.local.apply(fn)

    def reset(self) -> None:
        self.shift = self.wkv = None
        if self.local is not None:
            self.local.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("An RWKV state cannot be rolled back (assisted decoding is not supported).")

    def offload(self) -> None: ...

    def prefetch(self) -> None: ...

    def get_max_length(self) -> int:
        return -1


class ArwkvCache(Cache):
    """Generation state: an `ArwkvStateLayer` per RWKV layer, a transformers `DynamicLayer` per softmax layer.

    It counts the tokens it has seen, so `generate()` treats it like a `DynamicCache`: to continue a
    conversation pass the full token ids (and attention mask); only the unseen tail is fed.
    `save(path)` / `ArwkvCache.load(path)` store it as safetensors.
    """

    def __init__(
        self,
        config: ArwkvConfig | None = None,
        *,
        num_layers: int | None = None,
        softmax_layers=(),
        local_window: int = 0,
        local_sinks: int = 0,
    ):
        if config is not None:
            num_layers, softmax_layers = config.num_hidden_layers, config.softmax_layers
            local_window, local_sinks = config.local_window, config.local_sinks
        self.softmax_layers = sorted(int(i) for i in softmax_layers)
        self.local_window, self.local_sinks = int(local_window), int(local_sinks)
        layers = [
            DynamicLayer() if i in self.softmax_layers else ArwkvStateLayer(local_window, local_sinks)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        # Reported False on purpose: generate() slices already-seen prompt tokens only for caches that are not
        # all-linear, and this cache knows its length, so continuing a conversation works like DynamicCache.
        return [False] * len(self.layers)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def save(self, path: str) -> None:
        """Write the state to a safetensors file (tensors moved to CPU)."""
        from safetensors.torch import save_file

        tensors = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ArwkvStateLayer):
                if layer.wkv is not None:
                    tensors[f"layers.{i}.wkv"] = layer.wkv
                if layer.shift is not None:
                    tensors[f"layers.{i}.shift"] = layer.shift
                if layer.local is not None and layer.local.pos is not None:
                    for name in (*LocalWindowState.TENSORS, "pos"):
                        tensors[f"layers.{i}.local.{name}"] = getattr(layer.local, name)
            elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = layer.keys, layer.values
        metadata = {
            "format": "arwkv-cache-v1",
            "seen_tokens": str(self.seen_tokens),
            "num_layers": str(len(self.layers)),
            "softmax_layers": json.dumps(self.softmax_layers),
            "local": json.dumps([self.local_window, self.local_sinks]),
        }
        save_file(
            {k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(path), metadata=metadata
        )

    @classmethod
    def load(cls, path: str, device: str | torch.device | None = None) -> ArwkvCache:
        """Read a state written by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "arwkv-cache-v1":
            raise ValueError(f"{path} is not an arwkv cache file (format {meta.get('format')!r}).")
        window, sinks = json.loads(meta.get("local", "[0, 0]"))
        cache = cls(
            num_layers=int(meta["num_layers"]),
            softmax_layers=json.loads(meta["softmax_layers"]),
            local_window=window,
            local_sinks=sinks,
        )
        cache.seen_tokens = int(meta["seen_tokens"])
        move = lambda t: t.to(device) if device is not None else t
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, ArwkvStateLayer):
                shift = tensors.get(f"layers.{i}.shift")
                if f"layers.{i}.wkv" in tensors:
                    layer.set_state(
                        move(shift) if shift is not None else None, move(tensors[f"layers.{i}.wkv"])
                    )
                if layer.local is not None and f"layers.{i}.local.pos" in tensors:
                    for name in (*LocalWindowState.TENSORS, "pos"):
                        setattr(layer.local, name, move(tensors[f"layers.{i}.local.{name}"]))
                    layer.local.next_pos = cache.seen_tokens
            elif f"layers.{i}.keys" in tensors:
                layer.update(move(tensors[f"layers.{i}.keys"]), move(tensors[f"layers.{i}.values"]))
        return cache


# -----------------------------------------------------------------------------------------------------------
# Model


def packed_sequences(position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Documents packed in rows, by transformers' rule: a position step other than +1 starts a new document.

    Returns (cu_seqlens over the flattened [B * T] tokens, index of each row's last document), or (None, None)
    when every row holds one document.
    """
    B, T = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    if int(starts.sum()) == B:
        return None, None
    offsets = starts.flatten().nonzero().squeeze(-1)
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([B * T])])
    return cu_seqlens, starts.sum(dim=1).cumsum(0) - 1


class ArwkvPreTrainedModel(PreTrainedModel):
    config_class = ArwkvConfig
    config: ArwkvConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArwkvDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ArwkvTimeMix):  # children (its Linear layers) are initialized before the parent
            module.reset_parameters()


class ArwkvModel(ArwkvPreTrainedModel):
    def __init__(self, config: ArwkvConfig):
        super().__init__(config)
        # The teacher's config object drives the teacher's own modules; not a sub-config, so that
        # config.json keeps it as a plain dict.
        self.teacher_cfg = teacher_config_from_dict(config.teacher_config)
        self.teacher_cfg._attn_implementation = config._attn_implementation
        modules = teacher_modules(self.teacher_cfg.model_type)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ArwkvDecoderLayer(config, self.teacher_cfg, i, modules) for i in range(config.num_hidden_layers)]
        )
        self.norm = modules.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = modules.rotary(config=self.teacher_cfg)
        self.gradient_checkpointing = False
        self.post_init()

    def _softmax_masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict[str, Any]:
        """The teacher's 4D masks for kept softmax layers, one per attention type (full / sliding window)."""
        if not self.config.softmax_layers:
            return {}
        self.teacher_cfg._attn_implementation = self.config._attn_implementation
        kwargs = dict(
            config=self.teacher_cfg,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=self.config.softmax_layers[0],
        )
        kinds = {self.layers[i].attention_type for i in self.config.softmax_layers}
        masks = {"full_attention": create_causal_mask(**kwargs)} if "full_attention" in kinds else {}
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ArwkvCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        incoming_cache = cache
        if use_cache is None:  # no state to carry while training (and packed documents stay detectable)
            use_cache = self.config.use_cache and not self.training
        use_cache = use_cache or cache is not None
        if use_cache and cache is None:
            cache = ArwkvCache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0)

        # RWKV layers read the padding of the current tokens: the last T columns of the (past + T) mask
        rwkv_mask = None
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and not bool(attention_mask[:, -T:].all())
        ):
            rwkv_mask = attention_mask[:, -T:].bool()
        # Packed documents (no mask, no earlier state), as transformers detects them for attention masks
        cu_seqlens = last_segment = None
        if attention_mask is None and incoming_cache is None and T > 1:
            cu_seqlens, last_segment = packed_sequences(position_ids.expand(B, -1))
        masks = self._softmax_masks(inputs_embeds, attention_mask, incoming_cache, position_ids)
        needs_rope = (
            bool(self.config.softmax_layers) or self.config.use_rope or bool(self.config.local_window)
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if needs_rope else None

        hidden_states, v_first = inputs_embeds, None
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, v_first = layer(
                hidden_states,
                v_first,
                rwkv_mask=rwkv_mask,
                softmax_mask=masks.get(layer.attention_type),
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                cache=cache,
                cu_seqlens=cu_seqlens,
                last_segment=last_segment,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
        )

    def mixer_outputs(
        self,
        layer_inputs: dict[int, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Teacher-forced mixers (stage 1): run each RWKV layer's `self_attn` on the given normalized inputs.

        layer_inputs: RWKV layer index -> that layer's `input_layernorm` output [B, T, C] from the teacher;
        must include the first RWKV layer (it provides v_first, with gradient). Returns index -> mixer output.
        """
        first = self.config.rwkv_layers[0]
        if first not in layer_inputs:
            raise ValueError(
                f"layer_inputs must include the first RWKV layer ({first}) for the value residual."
            )
        B, T, C = layer_inputs[first].shape
        if position_ids is None:
            position_ids = torch.arange(T, device=layer_inputs[first].device).unsqueeze(0)
        cu_seqlens = None
        if attention_mask is None:
            cu_seqlens, _ = packed_sequences(position_ids.expand(B, -1))
        needs_rope = self.config.use_rope or bool(self.config.local_window)
        pe = self.rotary_emb(layer_inputs[first], position_ids) if needs_rope else None
        if cu_seqlens is not None and pe is not None:
            pe = tuple(t.expand(B, T, -1).reshape(1, B * T, -1) for t in pe)
        mask = attention_mask.bool() if attention_mask is not None else None
        outputs, v_first = {}, None
        for i in sorted(layer_inputs):
            x = layer_inputs[i] if cu_seqlens is None else layer_inputs[i].reshape(1, B * T, C)
            out, v_first, _ = self.layers[i].self_attn(x, v_first, mask, None, cu_seqlens, pe)
            outputs[i] = out.view(B, T, C)
        return outputs


class ArwkvForCausalLM(ArwkvPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ArwkvConfig):
        super().__init__(config)
        self.model = ArwkvModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = ArwkvLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ArwkvCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: ArwkvCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward. `cache` (alias `past_key_values`) is an `ArwkvCache`, created when use_cache."""
        kwargs.pop("output_attentions", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
        return out if return_dict is not False else out.to_tuple()

    # --- generation: the model brings its own cache (transformers would build a DynamicCache otherwise) ---

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = ArwkvCache(self.config)  # needed before prefill for chunked prefill
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    # --- conveniences ---

    def mixer_outputs(self, layer_inputs: dict[int, torch.Tensor], attention_mask=None, position_ids=None):
        """See `ArwkvModel.mixer_outputs` (stage-1 teacher forcing)."""
        return self.model.mixer_outputs(layer_inputs, attention_mask, position_ids)

    def untie_embeddings(self) -> None:
        """Give lm_head its own copy of the embedding matrix (stage-2 distillation trains them apart)."""
        if not self.config.tie_word_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            return
        self.config.tie_word_embeddings = False
        self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.detach().clone())
        self.all_tied_weights_keys = {}

    def save_pretrained(self, save_directory, *args, tokenizer=None, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the tokenizer when given."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        return result


__all__ = [
    "ArwkvCache",
    "ArwkvForCausalLM",
    "ArwkvModel",
    "ArwkvPreTrainedModel",
    "ArwkvTimeMix",
    "ArwkvTimeMix6",
    "wkv6",
    "wkv6_chunked",
    "wkv7",
    "wkv7_chunked",
]
