"""Pure-PyTorch chunked (WY / UT-transform) RWKV-7 kernel: CPU and CUDA, differentiable with autograd.

The block between the ``wkv7-chunked`` markers is copied verbatim into the student's single-file modeling code
(``tools/check_copies.py``), so it uses nothing but ``torch`` and carries no validation: ``arwkv.ops.wkv7``
validates. Math and the numerical bound are derived in README.md §3–§5.
"""

from __future__ import annotations

import torch

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
