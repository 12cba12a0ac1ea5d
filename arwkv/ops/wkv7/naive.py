"""Per-token RWKV-7 recurrence: the ground truth every other backend is tested against.

fla layout (state rows = key): ``u_t = h_{t-1}ᵀ a_t``, ``h_t = diag(w_t) h_{t-1} + k_t v_tᵀ + b_t u_tᵀ``,
``o_t = scale · h_tᵀ r_t`` with ``w_t = exp(g_t)``. See README.md §1.
"""

from __future__ import annotations

import torch


def wkv7_recurrent(
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
    """Token-by-token recurrence; fp64 inputs are computed in fp64, everything else in fp32."""
    if cu_seqlens is not None:
        offsets = cu_seqlens.tolist()
        outs, states = [], []
        for i in range(len(offsets) - 1):
            sl = slice(offsets[i], offsets[i + 1])
            h0 = None if initial_state is None else initial_state[i : i + 1]
            o, h = wkv7_recurrent(r[:, sl], w[:, sl], k[:, sl], v[:, sl], a[:, sl], b[:, sl], scale, h0, True)
            outs.append(o)
            states.append(h)
        return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)

    B, T, H, K = r.shape
    V = v.shape[-1]
    cdt = (
        torch.float64
        if torch.float64 in (r.dtype, w.dtype, k.dtype, v.dtype, a.dtype, b.dtype)
        else torch.float32
    )
    r, w, k, v, a, b = (x.to(cdt) for x in (r, w, k, v, a, b))
    decay = w.exp()
    if initial_state is None:
        h = r.new_zeros(B, H, K, V)
    else:
        h = initial_state.to(cdt)
    outs = []
    for t in range(T):
        u = torch.einsum("bhkv,bhk->bhv", h, a[:, t])
        h = (
            decay[:, t, :, :, None] * h
            + k[:, t, :, :, None] * v[:, t, :, None, :]
            + b[:, t, :, :, None] * u[:, :, None, :]
        )
        outs.append(torch.einsum("bhkv,bhk->bhv", h, r[:, t]) * scale)
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(v.dtype), (h if output_final_state else None)
