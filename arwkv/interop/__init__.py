"""Interop with the published ARWKV checkpoints (`rwkv_hybrid`) and llama.cpp (`arwkv7` GGUF)."""

from arwkv.interop.llamacpp import check_gguf, convert_to_gguf, export_for_llamacpp, llamacpp_problems
from arwkv.interop.rwkv_hybrid import (
    export_problems,
    export_rwkv_hybrid,
    load_rwkv_hybrid,
)

__all__ = [
    "check_gguf",
    "convert_to_gguf",
    "export_for_llamacpp",
    "export_problems",
    "export_rwkv_hybrid",
    "llamacpp_problems",
    "load_rwkv_hybrid",
]
