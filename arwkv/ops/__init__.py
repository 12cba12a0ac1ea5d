"""Operators: the RWKV-7 WKV recurrence (``wkv7``)."""

from arwkv.ops.wkv7 import wkv7

__all__ = ["wkv7"]
