"""Per-token RWKV-6 recurrence: the ground truth every other wkv6 backend is tested against.

fla layout (state rows = key), log-decay ``w_t = log(decay) <= 0``, bonus ``u`` [H, K] for the current token:

    o_t = scale · (h_{t-1} + diag(u) k_t v_tᵀ)ᵀ r_t        (reads the state *before* this token's write)
    h_t = diag(e^{w_t}) h_{t-1} + k_t v_tᵀ

See README.md §1.
"""

from __future__ import annotations

import torch


def wkv6_recurrent(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
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
            o, h = wkv6_recurrent(r[:, sl], k[:, sl], v[:, sl], w[:, sl], u, scale, h0, True)
            outs.append(o)
            states.append(h)
        return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)

    B, T, H, K = r.shape
    V = v.shape[-1]
    cdt = torch.float64 if torch.float64 in (r.dtype, k.dtype, v.dtype, w.dtype, u.dtype) else torch.float32
    r, k, v, w, u = (x.to(cdt) for x in (r, k, v, w, u))
    decay = w.exp()
    h = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cdt)
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", h + u[None, :, :, None] * kv, r[:, t]) * scale)
        h = decay[:, t, :, :, None] * h + kv
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(v.dtype), (h if output_final_state else None)
