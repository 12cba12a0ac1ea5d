"""`x @ W.T + b` with bf16 weights for a few rows of x on CPU (decode), through ``linear_cpu.cpp``.

The reference is ``F.linear(x.float(), W.float(), b.float())``: the kernel widens each bf16 weight to fp32 and
accumulates in fp32, so it agrees with the reference to fp32 rounding. It pays where a decode step is bound
by reading the weights: bf16 halves the bytes, and PyTorch's CPU bf16 matmul at 1-16 rows is slower than its
fp32 one on the machines we measured (benchmarks/generate.py, docs/results/cpu-kernel/).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from arwkv.ops import native_build

SOURCE = Path(__file__).with_name("linear_cpu.cpp")
#: rows of x up to which the kernel beats PyTorch's bf16 matmul (at 8 rows they tie, both ~2x its fp32 one)
MAX_ROWS = 4
#: weights below this many elements are read by one thread (starting threads costs more than it saves)
SERIAL_WEIGHTS = 1 << 20

_P = ctypes.c_void_p
_I = ctypes.c_int64
_LIBRARY: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL | str:
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    lib = native_build.load(SOURCE)
    if isinstance(lib, ctypes.CDLL):
        lib.arwkv_linear_bf16.argtypes = [_I, _I, _I, _P, ctypes.c_int, _P, _P, _P, ctypes.c_int, _I]
        lib.arwkv_matmul_bf16.argtypes = [_I, _I, _I, _P, ctypes.c_int, _P, _P, ctypes.c_int]
        _LIBRARY = lib
    return lib


def native_linear_available() -> bool:
    """True when the C++ kernel is built (or builds now) and loads on this machine."""
    return isinstance(_library(), ctypes.CDLL)


def _rows(x: torch.Tensor, features: int, name: str) -> torch.Tensor:
    if x.shape[-1] != features:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the weight takes {features}")
    x2 = x.reshape(-1, features)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    return x2 if x2.is_contiguous() else x2.contiguous()


def _checked(weight: torch.Tensor, name: str) -> ctypes.CDLL:
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.is_cuda:
        raise ValueError(f"{name} takes a 2-d bf16 CPU weight")
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


def linear_bf16(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a bf16 CPU `weight` [O, I], accumulated in fp32.

    x: fp32 or bf16 (other dtypes are read as fp32); returns `out_dtype` (default x's dtype). Needs
    ``native_linear_available()``; no autograd (decode). Faster than PyTorch up to MAX_ROWS rows of x."""
    lib = _checked(weight, "linear_bf16")
    O, I = weight.shape
    x2 = _rows(x, I, "linear_bf16")
    w = weight if weight.is_contiguous() else weight.contiguous()
    b = None
    if bias is not None:
        b = bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.float().contiguous()
    out_dtype = out_dtype or x.dtype
    y = torch.empty(x2.shape[0], O, dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    threads = 1 if O * I < SERIAL_WEIGHTS else torch.get_num_threads()
    lib.arwkv_linear_bf16(
        x2.shape[0], I, O, x2.data_ptr(), int(x2.dtype == torch.bfloat16), w.data_ptr(), _ptr(b),
        y.data_ptr(), int(y.dtype == torch.bfloat16), threads,
    )  # fmt: skip
    y = y.view(*x.shape[:-1], O)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def matmul_bf16(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x @ weight` for a small bf16 CPU `weight` [I, O] (the mixers' LoRA matrices), one thread."""
    lib = _checked(weight, "matmul_bf16")
    I, O = weight.shape
    x2 = _rows(x, I, "matmul_bf16")
    w = weight if weight.is_contiguous() else weight.contiguous()
    out_dtype = out_dtype or x.dtype
    y = torch.empty(x2.shape[0], O, dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
    lib.arwkv_matmul_bf16(
        x2.shape[0], I, O, x2.data_ptr(), int(x2.dtype == torch.bfloat16), w.data_ptr(), y.data_ptr(),
        int(y.dtype == torch.bfloat16),
    )  # fmt: skip
    y = y.view(*x.shape[:-1], O)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
