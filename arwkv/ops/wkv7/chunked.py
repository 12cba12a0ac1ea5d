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


def _wkv7_schedule(offsets: list[int], C: int, H: int, device: torch.device):
    """Chunk order for sequences [offsets[i], offsets[i+1]) of one flat token axis.

    Chunks are laid out step-major (all first chunks, then all second chunks, ...) over the sequences sorted
    longest first, so sequential step n is one contiguous slice of the `active[n]` still-running sequences.
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
    tok = (starts[slot] + step * C)[:, None] + torch.arange(C)  # [M, C] token of each chunk row
    valid = tok < ends[slot][:, None]
    # gather rows of x.reshape(total * H, D) into [M, H, C, D]; padding reads zero rows appended at `total`
    src = torch.where(valid, tok, total)[:, None, :] * H + torch.arange(H)[None, :, None]
    base = torch.empty(total, dtype=torch.long)
    base[tok[valid]] = (torch.arange(M)[:, None] * (H * C) + torch.arange(C))[valid]
    dst = base[:, None] + torch.arange(H) * C  # [total, H] row of each (token, head) in [M, H, C, V]
    unsort = torch.empty(N, dtype=torch.long)
    unsort[torch.tensor(order, dtype=torch.long)] = torch.arange(N)
    pad = not bool(valid.all())
    return active, order, src.flatten().to(device), dst.flatten().to(device), unsort.to(device), pad


def _wkv7_inv_unit_lower(A: torch.Tensor) -> torch.Tensor:
    """(I - A)^-1 for strictly lower-triangular A as (I + A)(I + A^2)(I + A^4)... (exact: A^C = 0)."""
    P = A + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for _ in range((A.shape[-1] - 1).bit_length() - 1):
        A = A @ A
        P = P + P @ A
    return P


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
    V, out_dtype = v.shape[-1], v.dtype
    C = int(chunk_size)
    cdt = (
        torch.float64
        if torch.float64 in (r.dtype, w.dtype, k.dtype, v.dtype, a.dtype, b.dtype)
        else torch.float32
    )
    offsets = cu_seqlens.tolist() if cu_seqlens is not None else [i * T for i in range(B + 1)]
    active, order, src, dst, unsort, pad = _wkv7_schedule(offsets, C, H, r.device)
    M, N = sum(active), len(offsets) - 1

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [M, H, C, D]
        x = x.reshape(-1, x.shape[-1])
        if pad:
            x = torch.cat([x, x.new_zeros(H, x.shape[-1])])
        return x.index_select(0, src).view(M, H, C, -1).to(cdt)

    g, r, k, v, a, b = chunks(w), chunks(r), chunks(k), chunks(v), chunks(a), chunks(b)
    # exponents relative to the chunk start (README §3.3): γ inclusive cumsum, γ⁻ = γ - g, γ_C chunk total
    gam = g.cumsum(-2)
    gC = gam[..., -1:, :]
    rt = r * (gam.exp() * scale)
    at = a * (gam - g).exp()
    ein = (-gam).exp()
    X = torch.cat([k * ein, b * ein], -2)
    tail = (gC - gam).exp()
    above = torch.ones(C, C, dtype=torch.bool, device=r.device).triu(1)
    Aq = (rt @ X.mT).masked_fill(torch.cat([above, above], 1), 0)  # [A_qk | A_qb], j <= i
    diag_up = above | torch.eye(C, dtype=torch.bool, device=r.device)
    Aa = (at @ X.mT).masked_fill(torch.cat([diag_up, diag_up], 1), 0)  # [A_ak | A_ab], j < i
    W, U0 = (_wkv7_inv_unit_lower(Aa[..., C:]) @ torch.cat([at, Aa[..., :C] @ v], -1)).split([K, V], -1)
    KV = (k * tail).mT @ v  # K̂ᵀ V
    bT = (b * tail).mT  # B̂ᵀ
    dC = gC.mT.exp()  # e^{γ_C} per key row

    if initial_state is None:
        h = r.new_zeros(N, H, K, V)
    else:
        h = initial_state.to(cdt).index_select(0, torch.tensor(order, device=r.device))
    finished, hs, us = [], [], []
    split = lambda x: torch.split(x, active)  # views; backward is one cat, not a zero-filled copy per step
    for n, (W_n, U0_n, KV_n, bT_n, dC_n) in enumerate(
        zip(split(W), split(U0), split(KV), split(bT), split(dC), strict=True)
    ):
        if active[n] < h.shape[0]:
            finished.append(h[active[n] :])
            h = h[: active[n]]
        U_n = U0_n + W_n @ h
        hs.append(h)
        us.append(U_n)
        h = dC_n * h + KV_n + bT_n @ U_n
    finished.append(h)
    O = rt @ torch.cat(hs) + Aq @ torch.cat([v, torch.cat(us)], -2)  # [M, H, C, V]
    o = O.reshape(-1, V).index_select(0, dst).view(B, T, H, V).to(out_dtype)
    final = None
    if output_final_state:
        final = torch.cat(finished[::-1]).index_select(0, unsort)
    return o, final


# </wkv7-chunked>
