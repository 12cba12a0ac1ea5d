"""bf16=auto: bf16 autocast only where the device multiplies bf16 natively; explicit bf16 elsewhere warns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arwkv.config import load_recipe
from arwkv.ops import precision
from arwkv.ops.precision import cpu_bf16_native, resolve_bf16

CPU = torch.device("cpu")


def test_cpu_probe_agrees_with_the_kernel_flags():
    """The probe reads what the CPU reports: avx512_bf16 or amx_bf16 in /proc/cpuinfo means native bf16."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo on this system to check the probe against")
    flags = set(info.read_text().split())
    assert cpu_bf16_native() == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_hardware(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native)
    bf16, note = resolve_bf16("auto", CPU)
    assert bf16 is native
    assert note is not None and ("bf16 autocast" if native else "fp32") in note


def test_explicit_bf16_on_an_emulating_cpu_is_kept_with_a_warning(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    bf16, note = resolve_bf16(True, CPU)
    assert bf16 is True
    assert note is not None and note.startswith("warning:") and "bf16=auto" in note
    assert resolve_bf16(False, CPU) == (False, None)
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    assert resolve_bf16(True, CPU) == (True, None)


def test_recipes_accept_auto_and_refuse_anything_else():
    assert load_recipe("stories260k", ["bf16=auto"]).bf16 == "auto"
    assert load_recipe("stories260k", ["bf16=true"]).bf16 is True
    assert load_recipe("smollm2-135m").bf16 == "auto"
