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


_WKV7_GROUP_ROWS = 4096


def _wkv7_schedule(offsets: list[int], C: int, H: int, device: torch.device):
    """Chunk order for sequences [offsets[i], offsets[i+1]) of one flat token axis.

    Chunks are laid out step-major (all first chunks, then all second chunks, ...) over the sequences sorted
    longest first, so sequential step n is one contiguous slice of the `active[n]` still-running sequences.
    Returns `rows`: for each (chunk, head, position) row, its row in x.reshape(tokens * H, D) (padding rows
    point at row 0), `valid` (None when there is no padding), `dst` (the inverse map) and `order` / `unsort`.
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
    M, total = sum(active), offsets[-1]
    act = torch.tensor(active, dtype=torch.long)
    starts = torch.tensor([offsets[s] for s in order], dtype=torch.long)
    ends = torch.tensor([offsets[s + 1] for s in order], dtype=torch.long)
    step = torch.repeat_interleave(torch.arange(steps), act)
    slot = torch.arange(M) - torch.repeat_interleave(act.cumsum(0) - act, act)
    tok = (starts[slot] + step * C)[:, None, None] + torch.arange(C)  # [M, 1, C] token of each chunk row
    valid = (tok < ends[slot][:, None, None]).expand(M, H, C).flatten()
    rows = (torch.where(tok < total, tok, 0) * H + torch.arange(H)[:, None]).flatten()  # [M * H * C]
    dst = torch.empty(total * H, dtype=torch.long)
    dst[rows[valid]] = torch.arange(M * H * C)[valid]
    unsort = torch.empty(N, dtype=torch.long)
    unsort[torch.tensor(order, dtype=torch.long)] = torch.arange(N)
    valid = None if bool(valid.all()) else valid.to(device)
    return (
        active,
        torch.tensor(order, device=device),
        rows.to(device),
        valid,
        dst.to(device),
        unsort.to(device),
    )


def _wkv7_inv_unit_lower(A: torch.Tensor) -> torch.Tensor:
    """(I - A)^-1 for strictly lower-triangular A as (I + A)(I + A^2)(I + A^4)... (exact: A^C = 0)."""
    P = A + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for _ in range((A.shape[-1] - 1).bit_length() - 1):
        A = A @ A
        P = P + P @ A
    return P


def _wkv7_fwd(g, r, k, v, a, b, h_in, sizes: list[int], scale: float, mask: torch.Tensor, save: bool):
    """One group of chunk steps. Inputs [P, C, D] (P = chunk-heads, step-major, `sizes` per step), h_in
    [sizes[0], K, V]. Returns O [P, C, V], h_out [sizes[0], K, V] (state after each slot's last step here)."""
    C, K, V = g.shape[1], g.shape[2], v.shape[2]
    # exponents relative to the chunk start (README §3.3): γ inclusive cumsum, γ⁻ = γ - g
    gam = g.cumsum(1)
    e = gam.exp()
    ein = e.reciprocal()
    em = (gam - g).exp()
    dC = e[:, -1:, :].mT  # e^{γ_C} per key row
    left = torch.cat([r * e if scale == 1.0 else r * e * scale, a * em], 1)  # [r̃; ã]
    right = torch.cat([k * ein, b * ein], 1)  # [k e^{-γ}; b e^{-γ}]
    L = (left @ right.mT).masked_fill_(mask, 0)  # [[A_qk, A_qb], [A_ak, A_ab]]
    Tm = _wkv7_inv_unit_lower(L[:, C:, C:])
    WU0 = Tm @ torch.cat([left[:, C:], L[:, C:, :C] @ v], -1)
    W, U0 = WU0[..., :K], WU0[..., K:]
    bT = right[:, C:].mT * dC  # B̂ᵀ
    KV = (right[:, :C].mT * dC) @ v  # K̂ᵀ V
    U, Hp = torch.empty_like(U0), torch.empty(g.shape[0], K, V, dtype=g.dtype, device=g.device)
    h_out, bufs = torch.empty_like(h_in), (torch.empty_like(h_in), torch.empty_like(h_in))
    h = h_in
    for i, (W_i, U0_i, KV_i, bT_i, dC_i, U_i, Hp_i) in enumerate(
        zip(*(torch.split(x, sizes) for x in (W, U0, KV, bT, dC, U, Hp)), strict=True)
    ):
        n = sizes[i]
        if n < h.shape[0]:  # these sequences ended at the previous step
            h_out[n : h.shape[0]].copy_(h[n:])
            h = h[:n]
        Hp_i.copy_(h)
        torch.baddbmm(U0_i, W_i, h, out=U_i)
        h = torch.baddbmm(KV_i, bT_i, U_i, out=bufs[i % 2][:n]).addcmul_(dC_i, Hp_i)
    h_out[: h.shape[0]].copy_(h)
    O = torch.baddbmm(torch.baddbmm(L[:, :C, :C] @ v, left[:, :C], Hp), L[:, :C, C:], U)
    saved = (e, em, ein, left, right, v, L, Tm, WU0, U, Hp, dC) if save else None
    return O, h_out, saved


def _wkv7_bwd(saved, dO, dh_out, sizes: list[int], scale: float, mask: torch.Tensor):
    """Gradients of _wkv7_fwd (README §4): a reverse state loop, then batched matmuls."""
    e, em, ein, left, right, v, L, Tm, WU0, U, Hp, dC = saved
    C, K = v.shape[1], Hp.shape[1]
    rt, at, kin, bin_ = left[:, :C], left[:, C:], right[:, :C], right[:, C:]
    W = WU0[..., :K]
    dU_loc = L[:, :C, C:].mT @ dO
    dh_O = rt.mT @ dO
    dX, dU = torch.empty_like(Hp), torch.empty_like(U)
    dh = dh_out[: sizes[-1]]
    for i in reversed(range(len(sizes))):
        n, lo = sizes[i], sum(sizes[:i])
        if dh.shape[0] < n:  # sequences whose last step here was step i
            dh = torch.cat([dh, dh_out[dh.shape[0] : n]])
        dX_i, dU_i = dX[lo : lo + n], dU[lo : lo + n]
        torch.mul(dh, dC[lo : lo + n], out=dX_i)
        torch.baddbmm(dU_loc[lo : lo + n], bin_[lo : lo + n], dX_i, out=dU_i)
        dh = torch.baddbmm(dh_O[lo : lo + n], W[lo : lo + n].mT, dU_i).add_(dX_i)
    if dh.shape[0] < dh_out.shape[0]:  # empty sequences: final state = initial state
        dh = torch.cat([dh, dh_out[dh.shape[0] :]])
    VU = torch.cat([v, U], 1)
    Z = VU @ dX.mT  # [v dXᵀ; U dXᵀ]: the state update's share of d(k e^{-γ}), d(b e^{-γ})
    dgC = (dX * Hp).sum(-1) + (right * Z).sum(1)  # direct dependence of the state on γ_C
    dY = Tm.mT @ torch.cat([dU @ Hp.mT, dU], -1)  # through W = T ã and U⁰ = T A_ak v
    dL = torch.cat([dO @ VU.mT, torch.cat([dY[..., K:] @ v.mT, dY @ WU0.mT], -1)], 1).masked_fill_(mask, 0)
    dleft = dL @ right
    dright = torch.baddbmm(Z, dL.mT, left)
    drt = torch.baddbmm(dleft[:, :C], dO, Hp.mT)
    dat = dleft[:, C:] + dY[..., :K]
    dkin, dbin = dright[:, :C], dright[:, C:]
    dv = torch.baddbmm(L[:, :, :C].mT @ torch.cat([dO, dY[..., K:]], 1), kin, dX)
    dgam = drt * rt + dat * at - dkin * kin - dbin * bin_
    dgam[:, -1] += dgC
    dg = dgam.flip(1).cumsum(1).flip(1) - dat * at
    dr = drt * e if scale == 1.0 else drt * e * scale
    return dg, dr, dkin * ein, dv, dat * em, dbin * ein, dh


class _Wkv7Group(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, r, k, v, a, b, h_in, sizes, scale, mask):
        O, h_out, saved = _wkv7_fwd(g, r, k, v, a, b, h_in, sizes, scale, mask, save=True)
        ctx.save_for_backward(*saved)
        ctx.sizes, ctx.scale, ctx.mask = sizes, scale, mask
        return O, h_out

    @staticmethod
    def backward(ctx, dO, dh_out):
        grads = _wkv7_bwd(ctx.saved_tensors, dO, dh_out, ctx.sizes, ctx.scale, ctx.mask)
        return (*grads, None, None, None)


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
    cdt = (
        torch.float64
        if torch.float64 in (r.dtype, w.dtype, k.dtype, v.dtype, a.dtype, b.dtype)
        else torch.float32
    )
    offsets = cu_seqlens.tolist() if cu_seqlens is not None else [i * T for i in range(B + 1)]
    active, order, rows, valid, dst, unsort = _wkv7_schedule(offsets, C, H, dev)
    N = len(offsets) - 1
    flat = [x.reshape(-1, x.shape[-1]) for x in (w, r, k, v, a, b)]  # rows = (token, head)
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state)
    )
    above = torch.ones(C, C, dtype=torch.bool, device=dev).triu(1)
    strict = above | torch.eye(C, dtype=torch.bool, device=dev)
    mask = torch.cat([torch.cat([above, above], 1), torch.cat([strict, strict], 1)])  # j > i / j >= i
    if initial_state is None:
        h = torch.zeros(N * H, K, V, dtype=cdt, device=dev)
    else:
        h = initial_state.to(cdt).index_select(0, order).view(N * H, K, V)
    o = None if grad else torch.empty(B * T * H, V, dtype=v.dtype, device=dev)
    finished, outs = [], []
    # Steps run in groups of about _WKV7_GROUP_ROWS (chunk, head, position) rows: every intermediate stays
    # small, so it is cache-resident and reuses freed memory instead of page-faulting in fresh allocations.
    n0, r0 = 0, 0
    while n0 < len(active):
        n1, r1 = n0, r0
        while n1 < len(active) and (n1 == n0 or r1 - r0 + active[n1] * H * C <= _WKV7_GROUP_ROWS):
            r1 += active[n1] * H * C
            n1 += 1
        idx = rows[r0:r1]
        keep = None if valid is None else valid[r0:r1].view(-1, C, 1)
        xs = [x.index_select(0, idx).view(-1, C, x.shape[-1]).to(cdt) for x in flat]
        if keep is not None:  # padding: decay 1 and no write (r, a of padding rows reach nothing)
            for j in (0, 2, 3, 5):
                xs[j] = torch.where(keep, xs[j], 0)
        sizes = [n * H for n in active[n0:n1]]
        if grad:
            O, h_out = _Wkv7Group.apply(*xs, h, sizes, scale, mask)
            outs.append(O.view(-1, V))
        else:
            O, h_out, _ = _wkv7_fwd(*xs, h, sizes, scale, mask, save=False)
            O = O.view(-1, V).to(o.dtype)
            if keep is not None:
                idx, O = idx[keep.flatten()], O[keep.flatten()]
            o.index_copy_(0, idx, O)
        nxt = active[n1] * H if n1 < len(active) else 0
        finished.append(h_out[nxt:])
        h = h_out[:nxt]
        n0, r0 = n1, r1
    if grad:
        o = (torch.cat(outs) if len(outs) > 1 else outs[0]).index_select(0, dst)
    final = None
    if output_final_state:
        final = torch.cat(finished[::-1]).view(N, H, K, V).index_select(0, unsort)
    return o.view(B, T, H, V).to(v.dtype), final


# </wkv7-chunked>
