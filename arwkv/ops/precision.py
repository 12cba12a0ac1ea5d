"""Which compute precision a device runs fast: bf16 autocast only pays where the hardware multiplies bf16.

On a CPU without bf16 matmul instructions (no AVX512-BF16, no AMX) PyTorch emulates bf16 and autocast is
several times *slower* than fp32 (measured on a 2-core AVX2 EPYC: the SmolLM2-135M forward 467 tok/s fp32,
68 tok/s bf16), so a recipe that says `bf16: auto` trains in fp32 there and in bf16 where it is native.
"""

from __future__ import annotations

import torch


def cpu_bf16_native() -> bool:
    """True when this CPU has bf16 matmul instructions (AVX512-BF16 or AMX) that PyTorch's kernels use."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast is expected to be faster than fp32 on `device`."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def cpu_features() -> str:
    """The CPU's vector capability as PyTorch dispatches on it (e.g. AVX2, AVX512), for logs and reports."""
    return str(torch.backends.cpu.get_cpu_capability())


def resolve_bf16(setting: bool | str, device: torch.device) -> tuple[bool, str | None]:
    """Turn a `bf16` setting (True, False or "auto") into a bool, and a line to tell the user (or None).

    "auto" picks bf16 where it is fast. An explicit True where bf16 is emulated is honoured, with a warning,
    since the run would be several times slower than fp32.
    """
    fast = bf16_is_fast(device)
    where = f"this CPU ({cpu_features()}, no AVX512-BF16/AMX)" if device.type == "cpu" else str(device)
    if setting == "auto":
        if fast:
            return True, "bf16=auto: bf16 autocast (native bf16 matmuls on this device)"
        return False, f"bf16=auto: fp32, since {where} has no native bf16 matmuls"
    if setting and not fast:
        return True, (
            f"warning: bf16=true on {where}: PyTorch emulates bf16 there, several times slower than fp32; "
            "set bf16=auto (or false)"
        )
    return bool(setting), None
