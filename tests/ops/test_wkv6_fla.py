"""GPU only: fla's Triton RWKV-6 kernels and the chunked kernel on CUDA against the fp64 CPU recurrence.

Tolerances as for wkv7 (rwkv7-operator.md §8 item 4): bf16 inputs < 1e-2 relative RMS, fp32 with IEEE dots
< 1e-4. Not run on CPU machines (skipped); never imports fla there.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton's fp32 tl.dot defaults to TF32 (~1e-3); must be set before any fla kernel is compiled.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from arwkv.ops import wkv6  # noqa: E402
from arwkv.ops.wkv6.fla import fla_available  # noqa: E402
from arwkv.ops.wkv6.naive import wkv6_recurrent  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_wkv6 import make_inputs, rel_rms  # noqa: E402

pytestmark = pytest.mark.gpu
needs_fla = pytest.mark.skipif(not fla_available(), reason="flash-linear-attention and CUDA needed")


def run_on(device, dtype, xs, h0, cu=None, **kw):
    """o, final state and all grads (CPU fp64 copies) for fixed cotangents; log-decay w stays fp32."""
    leaves = [x.to(device, torch.float32 if i == 3 else dtype).requires_grad_() for i, x in enumerate(xs)]
    h = h0.to(device, torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
    o, hT = wkv6(*leaves, initial_state=h, output_final_state=True, cu_seqlens=cu, **kw)
    gen = torch.Generator().manual_seed(3)
    do, dh = torch.randn(o.shape, generator=gen), torch.randn(hT.shape, generator=gen)
    grads = torch.autograd.grad((o * do.to(o)).sum() + (hT * dh.to(hT)).sum(), [*leaves, h])
    return [t.detach().double().cpu() for t in (o, hT, *grads)]


def check(got, ref, tol):
    names = ["o", "state", "dr", "dk", "dv", "dw", "du", "dh0"]
    for name, x, y in zip(names, got, ref, strict=True):
        assert rel_rms(x, y) < tol, f"{name}: relative RMS {rel_rms(x, y):.2e} >= {tol}"


@pytest.fixture(scope="module")
def case():
    xs, h0 = make_inputs(B=2, T=150, H=2, K=64, V=64, seed=41)
    return xs, h0, run_on("cpu", torch.float64, xs, h0, backend="recurrent")


@needs_fla
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
def test_fla_matches_fp64_reference(case, dtype, tol):
    xs, h0, ref = case
    check(run_on("cuda", dtype, xs, h0, backend="fla"), ref, tol)


@needs_fla
def test_fla_cu_seqlens_and_auto_backend():
    cu = torch.tensor([0, 17, 80, 81, 150])
    xs, _ = make_inputs(B=1, T=150, H=2, K=64, V=64, seed=43)
    h0 = torch.randn(4, 2, 64, 64, dtype=torch.float64)
    ref = run_on("cpu", torch.float64, xs, h0, cu=cu, backend="recurrent")
    check(run_on("cuda", torch.float32, xs, h0, cu=cu.cuda(), backend="fla"), ref, 1e-4)
    check(run_on("cuda", torch.bfloat16, xs, h0, cu=cu.cuda()), ref, 1e-2)  # auto = fla on CUDA


@needs_fla
def test_fla_short_inference_uses_fused_recurrent():
    xs, h0 = make_inputs(B=2, T=3, H=2, K=64, V=64, seed=47)
    ref_o, ref_h = wkv6_recurrent(*xs, initial_state=h0, output_final_state=True)
    with torch.no_grad():
        o, hT = wkv6(
            *(x.cuda().float() for x in xs), initial_state=h0.cuda().float(), output_final_state=True
        )
    assert rel_rms(o.cpu(), ref_o) < 1e-4 and rel_rms(hT.cpu(), ref_h) < 1e-4


def test_chunked_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    xs, h0, ref = case
    check(run_on("cuda", torch.float32, xs, h0, backend="chunked", chunk_size=32), ref, 1e-5)
    check(run_on("cuda", torch.bfloat16, xs, h0, backend="chunked"), ref, 1e-2)
