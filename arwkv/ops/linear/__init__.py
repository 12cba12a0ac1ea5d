"""Decode-time linear layers on CPU: bf16 weights read once per token (C++ kernel; F.linear reference)."""

from .native import MAX_ROWS, linear_bf16, matmul_bf16, native_linear_available

__all__ = ["MAX_ROWS", "linear_bf16", "matmul_bf16", "native_linear_available"]
