"""GPU only: fla's Triton kernels and the chunked kernel on CUDA against the fp64 CPU recurrence.

Tolerances from rwkv7-operator.md §8 item 4: bf16 inputs < 1e-2 relative RMS, fp32 with IEEE dots < 1e-4.
With $ARWKV_PARITY_LOG set, every compared tensor's error is appended there as one JSON line (the GPU script
benchmarks/gpu_convert.sh reports them).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

# Triton's fp32 tl.dot defaults to TF32 (~1e-3); must be set before any fla kernel is compiled.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from arwkv.ops import wkv7  # noqa: E402
from arwkv.ops.wkv7.fla import fla_available  # noqa: E402
from arwkv.ops.wkv7.naive import wkv7_recurrent  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_wkv7 import make_inputs, rel_rms  # noqa: E402

pytestmark = pytest.mark.gpu
needs_fla = pytest.mark.skipif(not fla_available(), reason="flash-linear-attention not installed")


# what the student hands fla under bf16 autocast (r, w, k, v, a, b): Linear outputs r, v are bf16, the
# fp32 log-decay, and k, a, b fp32 (they pass through fp32 parameters and the l2-normalised removal key)
MODEL_DTYPES = (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32)


def run_on(device, dtype, xs, h0, cu=None, dtypes=None, **kw):
    """o, final state and all grads (CPU fp64 copies) for fixed cotangents; log-decay w stays fp32 unless
    `dtypes` gives one dtype per input."""
    dtypes = dtypes or [torch.float32 if i == 1 else dtype for i in range(len(xs))]
    leaves = [x.to(device, dt).requires_grad_() for x, dt in zip(xs, dtypes, strict=True)]
    h = h0.to(device, torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
    o, hT = wkv7(*leaves, initial_state=h, output_final_state=True, cu_seqlens=cu, **kw)
    gen = torch.Generator().manual_seed(3)
    do, dh = torch.randn(o.shape, generator=gen), torch.randn(hT.shape, generator=gen)
    grads = torch.autograd.grad((o * do.to(o)).sum() + (hT * dh.to(hT)).sum(), [*leaves, h])
    return [t.detach().double().cpu() for t in (o, hT, *grads)]


def log_error(name: str, error: float, tol: float) -> None:
    path = os.environ.get("ARWKV_PARITY_LOG")
    if path:
        case = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1]
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "name": name, "error": error, "tol": tol}) + "\n")


def check(got, ref, tol):
    names = ["o", "state", "dr", "dw", "dk", "dv", "da", "db", "dh0"]
    errors = {name: float(rel_rms(x, y)) for name, x, y in zip(names, got, ref, strict=True)}
    for name, error in errors.items():
        log_error(name, error, tol)
    for name, error in errors.items():
        assert error < tol, f"{name}: relative RMS {error:.2e} >= {tol}"


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
def test_fla_matches_fp64_reference_with_the_models_dtype_mix(case):
    xs, h0, ref = case
    check(run_on("cuda", torch.bfloat16, xs, h0, backend="fla", dtypes=MODEL_DTYPES), ref, 1e-2)


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
    ref_o, ref_h = wkv7_recurrent(*xs, initial_state=h0, output_final_state=True)
    with torch.no_grad():
        o, hT = wkv7(
            *(x.cuda().float() for x in xs), initial_state=h0.cuda().float(), output_final_state=True
        )
    errors = {"o": float(rel_rms(o.cpu(), ref_o)), "state": float(rel_rms(hT.cpu(), ref_h))}
    for name, error in errors.items():
        log_error(name, error, 1e-4)
    assert errors["o"] < 1e-4 and errors["state"] < 1e-4, errors


def test_chunked_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    xs, h0, ref = case
    check(run_on("cuda", torch.float32, xs, h0, backend="chunked", chunk_size=32), ref, 1e-5)
    check(run_on("cuda", torch.bfloat16, xs, h0, backend="chunked"), ref, 1e-2)


@needs_fla
def test_fla_decode_steps_match_chunk():
    """Decoding token by token (fused recurrent, state carried) gives the chunk kernel's outputs and state."""
    xs, h0 = make_inputs(B=2, T=40, H=2, K=64, V=64, seed=53)
    xs = [x.cuda().float() for x in xs]
    with torch.no_grad():
        o_chunk, h_chunk = wkv7(*xs, initial_state=h0.cuda().float(), output_final_state=True, backend="fla")
        state, outs = h0.cuda().float(), []
        for t in range(xs[0].shape[1]):
            o, state = wkv7(*(x[:, t : t + 1] for x in xs), initial_state=state, output_final_state=True)
            outs.append(o)
    errors = {
        "o": float(rel_rms(torch.cat(outs, 1).cpu(), o_chunk.cpu())),
        "state": float(rel_rms(state.cpu(), h_chunk.cpu())),
    }
    for name, error in errors.items():
        log_error(name, error, 1e-4)
    assert errors["o"] < 1e-4 and errors["state"] < 1e-4, errors
