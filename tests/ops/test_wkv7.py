"""wkv7: the chunked and native kernels against the per-token recurrence (fp64 ground truth), conventions,
bad input.

Shapes are small (H=2, K=8, V=6: V != K catches layout mix-ups) except where the chunk math needs N=64.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from arwkv.errors import ArwkvError
from arwkv.ops import native_build, wkv7
from arwkv.ops.wkv7 import Wkv7InputError, chunked, conventions, dispatch, native
from arwkv.ops.wkv7.chunked import wkv7_chunked
from arwkv.ops.wkv7.naive import wkv7_recurrent
from arwkv.ops.wkv7.native import native_problem, wkv7_native

wkv7_module = sys.modules["arwkv.ops.wkv7"]  # the package; `arwkv.ops.wkv7` the attribute is the function
G_MIN = conventions.DECAY_LOG_MIN  # -0.60653..., RWKV-7's strongest decay

# The C++ kernel builds on any machine with g++; CI sets ARWKV_REQUIRE_NATIVE=1 so that it cannot skip there.
NATIVE_PROBLEM = native_problem()
needs_native = pytest.mark.skipif(
    NATIVE_PROBLEM is not None and not os.environ.get("ARWKV_REQUIRE_NATIVE"),
    reason=f"the native kernel is unavailable here: {NATIVE_PROBLEM}",
)
KERNELS = ["chunked", pytest.param("native", marks=needs_native)]


def kernel(name: str, C: int = 16):
    """The kernel under test with the chunked one's signature (the native kernel has no chunk size)."""
    return functools.partial(wkv7_chunked, chunk_size=C) if name == "chunked" else wkv7_native


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(B=2, T=20, H=2, K=8, V=6, *, g=None, eta=None, seed=0):
    """RWKV-7-shaped fp64 inputs: a = -κ̂, b = κ̂·η with unit κ̂, log-decay inside the clamp."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K) * 0.5, rnd(B, T, H, V)
    w = (
        G_MIN * torch.sigmoid(2 * rnd(B, T, H, K))
        if g is None
        else torch.full((B, T, H, K), float(g)).double()
    )
    kappa = F.normalize(rnd(B, T, H, K), dim=-1)
    eta = (
        torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) if eta is None else torch.full_like(r, eta)
    )
    return [r, w, k, v, -kappa, kappa * eta], rnd(B, H, K, V)


def run(fn, xs, h0, dtype=torch.float64, seed=1, cotangents=None, **kw):
    """Outputs, final state and gradients (w.r.t. r, w, k, v, a, b, h0) for fixed random cotangents."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in xs]
    h0 = None if h0 is None else h0.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    if h0 is not None:
        h0.requires_grad_()
    o, hT = fn(*leaves, initial_state=h0, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do, dh = cotangents or (torch.randn(o.shape, generator=gen), torch.randn(hT.shape, generator=gen))
    do, dh = do.to(o.dtype), dh.to(hT.dtype)
    grads = torch.autograd.grad((o * do).sum() + (hT * dh).sum(), leaves + ([h0] if h0 is not None else []))
    return o, hT, grads


def assert_match(got, ref, tol, what=""):
    o, hT, grads = got
    o_ref, hT_ref, grads_ref = ref
    names = ["o", "state", "dr", "dw", "dk", "dv", "da", "db", "dh0"][: 2 + len(grads_ref)]  # dh0: with h0
    for name, x, y in zip(names, [o, hT, *grads], [o_ref, hT_ref, *grads_ref], strict=True):
        assert x.shape == y.shape, (what, name)
        err = rel_rms(x, y)
        assert err < tol, f"{what} {name}: relative RMS error {err:.2e} >= {tol:.0e}"


CASES = [(C, T) for C in (16, 32, 64) for T in sorted({1, C - 1, C, C + 1, 3 * C + 5})]


@pytest.mark.parametrize("C,T", CASES)
def test_chunked_matches_recurrent_fp64_and_fp32(C, T):
    xs, h0 = make_inputs(T=T, seed=C + T)
    ref = run(wkv7_recurrent, xs, h0)
    assert_match(run(wkv7_chunked, xs, h0, chunk_size=C), ref, 1e-12, f"fp64 C={C} T={T}")
    assert_match(run(wkv7_chunked, xs, h0, torch.float32, chunk_size=C), ref, 1e-5, f"fp32 C={C} T={T}")


@needs_native
@pytest.mark.parametrize("T", [1, 31, 32, 33, 101])
@pytest.mark.parametrize("K,V", [(8, 6), (64, 64)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_native_matches_recurrent_fp64_and_fp32(T, K, V, with_h0):
    """Spans of the backward's checkpoints (32 tokens): shorter, exact, one longer, several; the generic and
    the head-size-64 code paths; zero and given initial state."""
    xs, h0 = make_inputs(B=2, T=T, K=K, V=V, seed=T + K)
    h0 = h0 if with_h0 else None
    ref = run(wkv7_recurrent, xs, h0)
    assert_match(run(wkv7_native, xs, h0), ref, 1e-12, f"fp64 T={T} K={K}")
    assert_match(run(wkv7_native, xs, h0, torch.float32), ref, 1e-5, f"fp32 T={T} K={K}")


@needs_native
def test_native_threads_give_identical_results(monkeypatch):
    """Each (sequence, head) is one task whatever the thread count: 1 and 2 threads agree bit for bit."""
    monkeypatch.setattr(native, "SERIAL_WORK", 0)  # thread even these small shapes
    xs, h0 = make_inputs(B=3, T=70, H=4, K=64, V=64, seed=41)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        results.append(run(wkv7_native, xs, h0, torch.float32))
    flat = [[o, hT, *grads] for o, hT, grads in results]
    for x, y in zip(*flat, strict=True):
        assert torch.equal(x, y)


def test_native_kernel_that_cannot_build_falls_back_with_one_line(monkeypatch, tmp_path, caplog):
    """No compiler: one warning line, `auto` runs the chunked kernel, `native` is a clear error."""
    monkeypatch.setenv("ARWKV_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setattr(native, "_LIBRARY", None)
    with caplog.at_level(logging.WARNING, logger="arwkv.ops.native_build"):
        assert not native.native_available()
        assert not native.native_available()  # asked twice, warned once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "using the slower PyTorch kernel" in lines[0], lines
    assert list(tmp_path.rglob("*.so")) == []
    xs, h0 = make_inputs(seed=43)
    o, _ = wkv7(*xs)  # auto: chunked
    torch.testing.assert_close(o, wkv7_recurrent(*xs)[0], rtol=0, atol=1e-12)
    with pytest.raises(Wkv7InputError, match="backend='native'.*or use backend='chunked'"):
        wkv7(*xs, backend="native")


@needs_native
def test_native_build_is_cached_and_keyed_by_source(monkeypatch, tmp_path):
    """A fresh cache builds one library; a second process (a cleared in-process cache) reuses it; a changed
    source builds its own."""
    monkeypatch.setenv("ARWKV_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setattr(native, "_LIBRARY", None)
    assert native.native_available()
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1 and built[0].name.startswith("wkv7_cpu-")
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setattr(native, "_LIBRARY", None)
    assert native.native_available() and built[0].stat().st_mtime_ns == stamp
    changed = tmp_path / "wkv7_cpu.cpp"
    changed.write_text(native.SOURCE.read_text() + "\n// changed\n")
    assert not isinstance(native_build.load(changed), str)
    assert len(list(tmp_path.rglob("*.so"))) == 2 and not list(tmp_path.rglob("*.tmp-*"))


@pytest.mark.parametrize("g", [G_MIN, -1e-7, 0.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_clamp_edges_and_eta_extremes(g, eta):
    """Constant decay at the clamp (exponents up to e^{±38.8} at C=64) or ~1, and η = 0 (no removal) / 1."""
    xs, h0 = make_inputs(T=3 * 64 + 5, g=g, eta=eta, seed=7)
    ref = run(wkv7_recurrent, xs, h0)
    for C in (16, 64):
        assert_match(run(wkv7_chunked, xs, h0, chunk_size=C), ref, 1e-12, f"fp64 g={g} eta={eta} C={C}")
        assert_match(run(wkv7_chunked, xs, h0, torch.float32, chunk_size=C), ref, 1e-5, f"fp32 g={g} C={C}")
    if NATIVE_PROBLEM is None:
        assert_match(run(wkv7_native, xs, h0), ref, 1e-12, f"native fp64 g={g} eta={eta}")
        assert_match(run(wkv7_native, xs, h0, torch.float32), ref, 1e-5, f"native fp32 g={g} eta={eta}")


def test_head_size_64_and_scale():
    xs, h0 = make_inputs(B=1, T=70, H=1, K=64, V=64, seed=3)
    ref = run(wkv7_recurrent, xs, h0, scale=0.125)
    assert_match(run(wkv7_chunked, xs, h0, torch.float32, chunk_size=32, scale=0.125), ref, 1e-5, "N=64")
    o_scaled, o_plain = wkv7_chunked(*xs, scale=0.125)[0], wkv7_recurrent(*xs)[0]
    assert rel_rms(o_scaled, o_plain * 0.125) < 1e-12  # from a zero state, scale only scales the output
    if NATIVE_PROBLEM is None:
        assert_match(run(wkv7_native, xs, h0, torch.float32, scale=0.125), ref, 1e-5, "native N=64")
        assert_match(run(wkv7_native, xs, h0, scale=0.125), ref, 1e-12, "native N=64 fp64")


def test_two_tokens_by_hand():
    """K = V = 2, written out in the test's docstring-free arithmetic below (fla layout: rows = key)."""
    # t=1: u = h0ᵀa = 0; h1 = k1 v1ᵀ = [[2, 3], [0, 0]]; o1 = h1ᵀ r1 = 1·[2, 3] + 1·[0, 0] = [2, 3]
    # t=2: u = h1ᵀ a2 = h1[0] = [2, 3]; with diag(w2) = diag(.5, 1):
    #      h2 = D h1 + k2 v2ᵀ + b2 uᵀ = [[1, 1.5], [0, 0]] + [[0, 0], [1, -1]] + [[1, 1.5], [1, 1.5]]
    #         = [[2, 3], [2, 0.5]];  o2 = h2ᵀ r2 = 1·[2, 3] + 2·[2, 0.5] = [6, 4]
    t = lambda *rows: torch.tensor(rows, dtype=torch.float64).view(1, 2, 1, 2)
    r, k, v = t([1, 1], [1, 2]), t([1, 0], [0, 1]), t([2, 3], [1, -1])
    a, b = t([0, 0], [1, 0]), t([0, 0], [0.5, 0.5])
    w = t([0, 0], [math.log(0.5), 0])
    want_o = torch.tensor([[2.0, 3.0], [6.0, 4.0]], dtype=torch.float64)
    want_h = torch.tensor([[2.0, 3.0], [2.0, 0.5]], dtype=torch.float64)
    for backend in ("recurrent", "chunked", *(("native",) if NATIVE_PROBLEM is None else ())):
        o, h = wkv7(r, w, k, v, a, b, output_final_state=True, backend=backend)
        torch.testing.assert_close(o.view(2, 2), want_o, rtol=0, atol=1e-14)
        torch.testing.assert_close(h.view(2, 2), want_h, rtol=0, atol=1e-14)
        S = conventions.state_fla_to_blinkdl(h).view(2, 2)  # BlinkDL rows = value
        torch.testing.assert_close(S, want_h.T, rtol=0, atol=0)
        o_half, _ = wkv7(r, w, k, v, a, b, scale=0.5, backend=backend)
        torch.testing.assert_close(o_half.view(2, 2), want_o / 2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cu_seqlens_equals_separate_sequences(dtype, tol, name):
    lens = [5, 37, 0, 20, 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    xs, h0 = make_inputs(B=1, T=sum(lens), seed=11)
    h0 = torch.randn(len(lens), *h0.shape[1:], dtype=torch.float64)
    do, dh = torch.randn(1, sum(lens), 2, 6), torch.randn(len(lens), 2, 8, 6)
    packed = run(kernel(name), xs, h0, dtype, cu_seqlens=cu, cotangents=(do, dh))
    ref = run(wkv7_recurrent, xs, h0, cu_seqlens=cu, cotangents=(do, dh))
    assert_match(packed, ref, tol, "packed vs recurrent")
    # against running each sequence alone through the chunked kernel
    o, hT, grads = packed
    for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if hi == lo:
            torch.testing.assert_close(hT[i].double(), h0[i])  # empty sequence: state passes through
            continue
        one_cot = (do[:, lo:hi], dh[i : i + 1])
        one = run(kernel(name), [x[:, lo:hi] for x in xs], h0[i : i + 1], dtype, cotangents=one_cot)
        assert rel_rms(o[:, lo:hi], one[0]) < tol
        assert rel_rms(hT[i : i + 1], one[1]) < tol
        for g_packed, g_one in zip(grads[:6], one[2][:6], strict=True):
            assert rel_rms(g_packed[:, lo:hi], g_one) < tol
        assert rel_rms(grads[6][i : i + 1], one[2][6]) < tol


@pytest.mark.parametrize("name", KERNELS)
def test_split_with_carried_state_equals_one_pass(name):
    xs, h0 = make_inputs(B=2, T=50, seed=5)
    leaves = [x.clone().requires_grad_() for x in xs]
    fn = kernel(name)
    o, hT = fn(*leaves, initial_state=h0, output_final_state=True)
    o1, h_mid = fn(*[x[:, :21] for x in leaves], initial_state=h0, output_final_state=True)
    o2, h_end = fn(*[x[:, 21:] for x in leaves], initial_state=h_mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_end, hT, rtol=0, atol=1e-12)
    g_one = torch.autograd.grad(o.square().sum() + hT.sum(), leaves)
    g_two = torch.autograd.grad(torch.cat([o1, o2], 1).square().sum() + h_end.sum(), leaves)
    for x, y in zip(g_one, g_two, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-11)


@pytest.mark.parametrize("group_rows", [1, 40, 500])
def test_step_groups_and_shrinking_batch(monkeypatch, group_rows):
    """Several step groups, sequences ending inside a group and across groups, and an empty sequence."""
    monkeypatch.setattr(chunked, "_WKV7_GROUP_ROWS", group_rows)
    cu = torch.tensor([0, 3, 40, 40, 75, 140])
    xs, _ = make_inputs(B=1, T=140, seed=13)
    h0 = torch.randn(5, 2, 8, 6, dtype=torch.float64)
    ref = run(wkv7_recurrent, xs, h0, cu_seqlens=cu)
    assert_match(run(wkv7_chunked, xs, h0, chunk_size=16, cu_seqlens=cu), ref, 1e-12, f"groups={group_rows}")
    xs, h0 = make_inputs(B=3, T=45, seed=14)
    assert_match(run(wkv7_chunked, xs, h0, chunk_size=16), run(wkv7_recurrent, xs, h0), 1e-12, "batch")


@pytest.mark.parametrize("name", KERNELS)
def test_inference_path_equals_autograd_path(name):
    """Without gradients the kernel writes into preallocated buffers; it must agree with the autograd path."""
    cu = torch.tensor([0, 9, 60, 61])
    xs, _ = make_inputs(B=1, T=61, seed=17)
    h0 = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        o, hT = kernel(name)(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_g, hT_g, _ = run(kernel(name), xs, h0, cu_seqlens=cu)
    torch.testing.assert_close(o, o_g, rtol=0, atol=1e-13)
    torch.testing.assert_close(hT, hT_g, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", KERNELS)
def test_bf16_inputs_fp32_state(name):
    xs, h0 = make_inputs(B=1, T=40, H=2, K=64, V=64, seed=19)
    ref_o, ref_h = wkv7_recurrent(*xs, initial_state=h0, output_final_state=True)
    bf = [x.to(torch.bfloat16) for x in xs]
    bf[1] = xs[1].float()  # log-decay stays fp32 (rwkv7-operator.md §5.3)
    o, hT = wkv7(*bf, initial_state=h0.float(), output_final_state=True, backend=name)
    assert o.dtype == torch.bfloat16 and hT.dtype == torch.float32
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(hT, ref_h) < 1e-2


def test_backends_agree_and_auto_is_native_on_cpu_else_chunked(monkeypatch):
    xs, h0 = make_inputs(seed=23)
    o_rec, h_rec = wkv7(*xs, initial_state=h0, output_final_state=True, backend="recurrent")
    for backend in ("chunked", *(("native",) if NATIVE_PROBLEM is None else ())):
        o, h = wkv7(*xs, initial_state=h0, output_final_state=True, backend=backend, chunk_size=32)
        torch.testing.assert_close(o, o_rec, rtol=0, atol=1e-12)
        torch.testing.assert_close(h, h_rec, rtol=0, atol=1e-12)
    calls = []
    # the dispatch (arwkv/ops/wkv7/dispatch.py, the block the student inlines) calls the chunked kernel
    monkeypatch.setattr(
        dispatch, "wkv7_chunked", lambda *a, **kw: calls.append(kw["chunk_size"]) or (None, None)
    )
    monkeypatch.setattr(wkv7_module, "wkv7_native", lambda *a, **kw: calls.append("native") or (None, None))
    wkv7(*xs)
    assert calls == (["native"] if NATIVE_PROBLEM is None else [wkv7_module.CHUNK_SIZE_DEFAULT])
    calls.clear()
    monkeypatch.setattr(wkv7_module, "native_available", lambda: False)
    wkv7(*xs)
    assert calls == [wkv7_module.CHUNK_SIZE_DEFAULT]


def test_strong_decay_shrinks_default_chunk_or_raises():
    xs, h0 = make_inputs(T=40, g=-3.0, seed=29)  # beyond RWKV-7's clamp: 16 * 3 > MAX_CHUNK_EXPONENT
    o_ref, h_ref = wkv7(*xs, initial_state=h0, output_final_state=True, backend="recurrent")
    o, h = wkv7(*xs, initial_state=h0, output_final_state=True, backend="chunked")  # runs with chunk 8
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    if NATIVE_PROBLEM is None:  # the recurrence has no exponent limit
        o, h = wkv7(*xs, initial_state=h0, output_final_state=True, backend="native")
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)
    with pytest.raises(Wkv7InputError, match="chunk_size <= 13"):
        wkv7(*xs, backend="chunked", chunk_size=16)
    xs, _ = make_inputs(T=4, g=-50.0)
    with pytest.raises(Wkv7InputError, match="backend='native' or 'recurrent'"):
        wkv7(*xs, backend="chunked")
    o_ref, _ = wkv7(*xs, backend="recurrent")
    if NATIVE_PROBLEM is None:
        torch.testing.assert_close(wkv7(*xs)[0], o_ref, rtol=0, atol=1e-12)  # auto: native


def test_decay_conventions_round_trip_and_agree():
    d = torch.linspace(-12, 12, 97, dtype=torch.float64)
    g = conventions.d_to_logdecay(d)
    assert g.max() < 0 and g.min() > G_MIN
    torch.testing.assert_close(conventions.logdecay_to_d(g), d, rtol=1e-9, atol=1e-9)
    wp = conventions.d_to_double_exp(d)
    torch.testing.assert_close(conventions.logdecay_to_double_exp(g), wp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conventions.double_exp_to_logdecay(wp), g, rtol=1e-12, atol=0)
    decay = conventions.logdecay_to_decay(g)
    torch.testing.assert_close(
        decay, torch.exp(-torch.exp(wp)), rtol=1e-14, atol=0
    )  # what BlinkDL kernels do
    torch.testing.assert_close(conventions.decay_to_logdecay(decay), g, rtol=1e-12, atol=1e-16)
    assert conventions.logdecay_to_decay(g.to(torch.bfloat16)).dtype == torch.float32


def test_state_layouts_round_trip_and_match_blinkdl_recurrence():
    """An independent BlinkDL-layout recurrence (rows = value, rwkv7-operator.md §1.1 index form)."""
    xs, h0 = make_inputs(B=1, T=9, H=1, K=5, V=3, seed=31)
    r, w, k, v, a, b = (x[0, :, 0] for x in xs)
    S = conventions.state_fla_to_blinkdl(h0)[0, 0]  # [V, K]
    assert torch.equal(conventions.state_blinkdl_to_fla(conventions.state_fla_to_blinkdl(h0)), h0)
    ys = []
    for t in range(r.shape[0]):
        sa = S @ a[t]
        S = S * w[t].exp() + sa[:, None] * b[t] + v[t][:, None] * k[t]
        ys.append(S @ r[t])
    o, hT = wkv7(*xs, initial_state=h0, output_final_state=True, backend="recurrent")
    torch.testing.assert_close(o[0, :, 0], torch.stack(ys), rtol=0, atol=1e-13)
    torch.testing.assert_close(conventions.state_fla_to_blinkdl(hT)[0, 0], S, rtol=0, atol=1e-13)


def _bad(**change):
    xs, h0 = make_inputs(B=1, T=6)
    args = dict(zip("rwkvab", xs, strict=True))
    kw = {}
    for key, val in change.items():
        (args if key in args else kw)[key] = val(args) if callable(val) else val
    return lambda: wkv7(*args.values(), **kw)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k=lambda a: a["k"][:, :, :, :4]), "k has shape"),
        (dict(v=lambda a: a["v"][:, :5]), "v has shape"),
        (dict(r=lambda a: a["r"][0]), "4-D"),
        (dict(w=lambda a: a["w"].abs() + 0.1), "log-decay and must be <= 0"),
        (dict(initial_state=torch.zeros(1, 2, 8, 6, dtype=torch.bfloat16)), "float32"),
        (dict(initial_state=torch.zeros(1, 2, 6, 8)), "expected \\[N, H, K, V\\]"),
        (dict(backend="triton"), "unknown backend"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5])), "must rise from 0 to T=6"),
        (dict(cu_seqlens=torch.tensor([0.0, 6.0])), "integer"),
    ],
)
def test_bad_input_is_a_clear_error(change, match):
    with pytest.raises(Wkv7InputError, match=match):
        _bad(**change)()


def test_bad_input_batch_with_cu_seqlens_and_fla_on_cpu():
    xs, _ = make_inputs(B=2, T=6)
    with pytest.raises(Wkv7InputError, match="batch size 1"):
        wkv7(*xs, cu_seqlens=torch.tensor([0, 6]))
    assert issubclass(Wkv7InputError, ArwkvError) and issubclass(Wkv7InputError, ValueError)
    if not torch.cuda.is_available():
        with pytest.raises(Wkv7InputError, match="backend='fla' needs CUDA"):
            wkv7(*xs, backend="fla")


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant, name):
    """The custom backward under torch.utils.checkpoint (non-reentrant allows one unpack of saved tensors)."""
    xs = [x.requires_grad_() for x in make_inputs(B=1, T=40, seed=37)[0]]
    ref = torch.autograd.grad(wkv7_recurrent(*xs)[0].square().sum(), xs)
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss = torch.utils.checkpoint.checkpoint(
        lambda *x: kernel(name)(*x)[0].square().sum(), *leaves, use_reentrant=reentrant
    )
    loss.backward()
    for x, g in zip(leaves, ref, strict=True):
        assert rel_rms(x.grad, g) < 1e-12


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_ignores_an_enclosing_cpu_autocast(name):
    """Under bf16 autocast (training with bf16=True) the kernel still computes in fp32: same results."""
    xs, h0 = make_inputs(B=2, T=37, H=2, K=16, V=16, seed=5)
    xs = [x.float() for x in xs]

    def run(autocast: bool):
        leaves = [x.clone().requires_grad_() for x in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, hT = wkv7(*leaves, initial_state=h0.float(), output_final_state=True, backend=name)
            (o.sum() + hT.square().sum()).backward()
        return [o, hT, *(x.grad for x in leaves)]

    for got, ref in zip(run(True), run(False), strict=True):
        assert got.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
