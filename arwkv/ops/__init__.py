"""Operators: the RWKV-7 and RWKV-6 WKV recurrences (``wkv7``, ``wkv6``)."""

from arwkv.ops.wkv6 import wkv6
from arwkv.ops.wkv7 import wkv7

__all__ = ["wkv6", "wkv7"]
