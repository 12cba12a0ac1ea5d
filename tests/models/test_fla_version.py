"""The student's own fla gate (the modeling file cannot import arwkv.ops): a wrong fla version is refused for
wkv_backend='fla' and skipped with one warning for 'auto', for both RWKV-7 and RWKV-6 mixers."""

from __future__ import annotations

import importlib.metadata

import pytest

from arwkv.models.arwkv import modeling_arwkv as M


def _installed(monkeypatch, version: str | None) -> None:
    def fake(dist: str) -> str:
        if version is None or dist != "fla-core":
            raise importlib.metadata.PackageNotFoundError(dist)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)
    monkeypatch.setattr(M, "_FLA_WARNED", set())


@pytest.mark.parametrize("version", ["0.4.2", "0.5.2", "0.7.0"])
@pytest.mark.parametrize("kernels", [M._fla_kernels, M._fla_kernels6])
def test_wrong_fla_version(monkeypatch, caplog, version, kernels):
    _installed(monkeypatch, version)
    needs = rf"fla {version} is installed but the student needs fla >=0.6.0,<0.7"
    with pytest.raises(ImportError, match=needs):
        kernels("fla")
    assert kernels("auto") is None and kernels("auto") is None
    warnings = [r for r in caplog.records if "using the (slow) chunked PyTorch kernel" in r.getMessage()]
    assert len(warnings) == 1  # once per process, not per layer call


@pytest.mark.parametrize("version", ["0.6.0", "0.6.3rc1"])
def test_supported_or_absent_fla_is_not_a_version_problem(monkeypatch, version):
    _installed(monkeypatch, version)
    assert M._fla_version_problem() is None
    _installed(monkeypatch, None)
    assert M._fla_version_problem() is None
