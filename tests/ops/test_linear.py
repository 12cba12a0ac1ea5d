"""The bf16 decode linear kernel (arwkv/ops/linear) against F.linear in fp64, and its use in the student."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from arwkv.convert import build_student
from arwkv.convert.families import tiny_teacher
from arwkv.models import ArwkvCache
from arwkv.models.arwkv import modeling_arwkv
from arwkv.ops.linear import linear_bf16, matmul_bf16, native, native_linear_available

pytestmark = pytest.mark.skipif(
    not native_linear_available() and not os.environ.get("ARWKV_REQUIRE_NATIVE"),
    reason="the native linear kernel is unavailable here (no g++?)",
)


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("in_out", [(13, 7), (16, 1), (576, 130), (70, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_fp64_reference(rows, in_out, bias):
    g = torch.Generator().manual_seed(rows * 100 + in_out[0])
    I, O = in_out
    x = torch.randn(rows, I, generator=g)
    w = torch.randn(O, I, generator=g).bfloat16()
    b = torch.randn(O, generator=g) if bias else None
    y = linear_bf16(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, O)
    ref = reference(x, w, b)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6


def test_keeps_leading_dims_and_input_dtype_and_bf16_bias():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 40, generator=g).bfloat16()
    w = torch.randn(24, 40, generator=g).bfloat16()
    b = torch.randn(24, generator=g).bfloat16()
    y = linear_bf16(x, w, b)
    assert y.shape == (2, 1, 24) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x, w, b).float().bfloat16().float(), rtol=8e-3, atol=1e-2)


def test_threads_give_identical_results(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 96, generator=g), torch.randn(300, 96, generator=g).bfloat16()
    monkeypatch.setattr(native, "SERIAL_WEIGHTS", 0)
    outs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        outs.append(linear_bf16(x, w))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_bad_weights_are_one_clear_error():
    with pytest.raises(ValueError, match="bf16 CPU weight"):
        linear_bf16(torch.randn(1, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="x has 5 features, the weight takes 4"):
        linear_bf16(torch.randn(1, 5), torch.randn(3, 4).bfloat16())


def _student_bf16():
    torch.manual_seed(0)
    student = build_student(tiny_teacher("llama", seed=0), init="copy").eval()
    with torch.no_grad():  # make every mixer part contribute (copy init leaves several at 0)
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return student.to(torch.bfloat16)


def test_student_linears_are_arwkv_linears_with_unchanged_state_dict():
    student = _student_bf16()
    kinds = {type(m) for m in student.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {modeling_arwkv.ArwkvLinear}
    plain = build_student(tiny_teacher("llama", seed=0), init="copy")
    assert student.state_dict().keys() == plain.state_dict().keys()


def test_bf16_decode_uses_the_kernel_and_matches_pytorch(monkeypatch):
    """Decode steps of a bf16 student read their weights through the kernel; the logits match the same
    steps through F.linear up to bf16 rounding, and training (autograd) never takes the kernel."""
    student = _student_bf16()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    calls = []

    def counted(kernel):
        return lambda *a: calls.append(kernel.__name__) or kernel(*a)

    monkeypatch.setattr(
        modeling_arwkv, "_NATIVE_LINEAR", (counted(native.linear_bf16), counted(native.matmul_bf16), 4)
    )

    def decode(model):
        cache = ArwkvCache(model.config)
        with torch.no_grad():
            model(ids[:, :6], cache=cache)
            return torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 9)], 1)

    fast = decode(student)
    assert {"linear_bf16", "matmul_bf16"} <= set(calls), "the decode steps did not use the native kernels"
    monkeypatch.setattr(modeling_arwkv, "_NATIVE_LINEAR", False)
    slow = decode(copy.deepcopy(student))
    assert (fast.float() - slow.float()).abs().max() < 0.05 * slow.float().abs().max()
    calls.clear()
    monkeypatch.setattr(
        modeling_arwkv, "_NATIVE_LINEAR", (counted(native.linear_bf16), counted(native.matmul_bf16), 4)
    )
    student.train()
    student(ids[:1, :2]).logits.float().sum().backward()
    assert not calls and student.lm_head.weight.grad is not None


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("in_out", [(576, 64), (32, 576), (5, 3)])
def test_matmul_matches_fp64_reference(rows, in_out):
    g = torch.Generator().manual_seed(rows + in_out[1])
    x = torch.randn(rows, in_out[0], generator=g)
    w = torch.randn(*in_out, generator=g).bfloat16()
    ref = x.double() @ w.double()
    y = matmul_bf16(x, w)
    assert y.dtype == torch.float32 and ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    yb = matmul_bf16(x.bfloat16(), w, torch.float32)  # bf16 in, fp32 out
    refb = x.bfloat16().double() @ w.double()
    assert ((yb.double() - refb).abs().max() / refb.abs().max()) < 1e-6
    # bf16 out: rounded to nearest even, as PyTorch rounds
    assert torch.equal(matmul_bf16(x, w, torch.bfloat16), y.bfloat16())
