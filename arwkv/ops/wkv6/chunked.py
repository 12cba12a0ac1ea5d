"""Pure-PyTorch chunked RWKV-6 kernel: CPU and CUDA, differentiable through autograd (exact, README §2).

The block between the ``wkv6-chunked`` markers is copied verbatim into the student's single-file modeling code
(``tools/check_copies.py``), so it uses nothing but ``torch`` and the chunk schedule of the wkv7 block (which
precedes it there) and carries no validation: ``arwkv.ops.wkv6`` validates.
"""

from __future__ import annotations

import torch

from arwkv.ops.wkv7.chunked import wkv7_schedule

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
