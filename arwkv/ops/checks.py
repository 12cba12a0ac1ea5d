"""Argument checks shared by the WKV operators (wkv6, wkv7): packing offsets and the initial state."""

from __future__ import annotations

import torch


def check_packing_and_state(
    error: type[Exception],
    *,
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    device: torch.device,
    fp64: bool,
    chunk_size: int | None,
    cu_seqlens: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    state_hint: str = "",
) -> int:
    """Raise `error` on a bad chunk size, bad `cu_seqlens` or an initial state of the wrong shape, dtype or
    device; return the number of sequences N. `fp64`: the inputs are float64, so may the state be."""
    if T == 0:
        raise error("empty input: T must be >= 1")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise error(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise error(
                f"cu_seqlens needs packed inputs with batch size 1; got B={B} "
                "(concatenate the sequences along T)"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2:
            raise error("cu_seqlens must be a 1-D integer tensor of N+1 offsets [0, ..., T]")
        offs = cu_seqlens.tolist()
        if offs[0] != 0 or offs[-1] != T or any(x > y for x, y in zip(offs[:-1], offs[1:], strict=True)):
            raise error(f"cu_seqlens must rise from 0 to T={T}; got {offs[:4]}...{offs[-2:]}")
        n_seq = len(offs) - 1
    if initial_state is not None:
        want = (n_seq, H, K, V)
        if tuple(initial_state.shape) != want:
            raise error(
                f"initial_state has shape {tuple(initial_state.shape)}; expected [N, H, K, V] = "
                f"{list(want)} (fla layout, rows = key{state_hint})"
            )
        ok = (torch.float32, torch.float64) if fp64 else (torch.float32,)
        if initial_state.dtype not in ok:
            raise error(
                f"initial_state must be float32 (the state is always accumulated in fp32); "
                f"got {initial_state.dtype}"
            )
        if initial_state.device != device:
            raise error(f"initial_state is on {initial_state.device} but the inputs on {device}")
    return n_seq
