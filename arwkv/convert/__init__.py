"""Build-time conversion: teacher loaders, family table, `build_student`. Never needed to run a student."""

from __future__ import annotations

from typing import Any

from arwkv.convert.build import build_student
from arwkv.convert.families import FAMILIES, check_teacher

_LOADERS = {
    "load_llama2c": "arwkv.convert.llama2c",
    "load_gguf_teacher": "arwkv.convert.gguf",
    "load_teacher": "arwkv.convert.teachers",
}


def __getattr__(name: str) -> Any:
    # teacher loaders import optional packages (gguf, sentencepiece): load them on first use
    if name in _LOADERS:
        import importlib

        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(f"module 'arwkv.convert' has no attribute {name!r}")


__all__ = ["FAMILIES", "build_student", "check_teacher", "load_gguf_teacher", "load_llama2c", "load_teacher"]
