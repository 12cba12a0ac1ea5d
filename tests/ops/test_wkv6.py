"""wkv6: the chunked kernel against the per-token recurrence (fp64 ground truth), decode step, bad input.

Shapes are small (H=2, K=8, V=6: V != K catches layout mix-ups) except where N=64 matters. Two decay regimes:
RWKV-6-like decays (the chunked kernel's factorized path) and decays strong enough that a chunk's cumulative
decay leaves fp32's range (its sub-blocked safe path).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.utils.checkpoint

from arwkv.errors import ArwkvError
from arwkv.ops import wkv6
from arwkv.ops.wkv6 import Wkv6InputError, chunked, raw_to_logdecay
from arwkv.ops.wkv6.chunked import wkv6_chunked, wkv6_step
from arwkv.ops.wkv6.naive import wkv6_recurrent

wkv6_module = sys.modules["arwkv.ops.wkv6"]  # the package; `arwkv.ops.wkv6` the attribute is the function


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(B=2, T=20, H=2, K=8, V=6, *, w_raw_mean=-2.0, g=None, seed=0):
    """fp64 inputs; log-decay w = -exp(w_raw), w_raw ~ N(w_raw_mean, 1) (RWKV-6's parametrization)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K) * 0.5, rnd(B, T, H, V)
    w = -torch.exp(rnd(B, T, H, K) + w_raw_mean) if g is None else torch.full((B, T, H, K), float(g)).double()
    u = rnd(H, K) * 0.5
    return [r, k, v, w, u], rnd(B, H, K, V)


def run(fn, xs, h0, dtype=torch.float64, seed=1, cotangents=None, **kw):
    """Outputs, final state and gradients (w.r.t. r, k, v, w, u, h0) for fixed random cotangents."""
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
    names = ["o", "state", "dr", "dk", "dv", "dw", "du", "dh0"]
    for name, x, y in zip(names, [o, hT, *grads], [o_ref, hT_ref, *grads_ref], strict=True):
        assert x.shape == y.shape, (what, name)
        err = rel_rms(x, y)
        assert err < tol, f"{what} {name}: relative RMS error {err:.2e} >= {tol:.0e}"


CASES = [(C, T) for C in (16, 32, 64) for T in sorted({1, C - 1, C, C + 1, 3 * C + 5})]


@pytest.mark.parametrize("C,T", CASES)
def test_chunked_matches_recurrent_fp64_and_fp32(C, T):
    xs, h0 = make_inputs(T=T, seed=C + T)
    ref = run(wkv6_recurrent, xs, h0)
    assert_match(run(wkv6_chunked, xs, h0, chunk_size=C), ref, 1e-12, f"fp64 C={C} T={T}")
    assert_match(run(wkv6_chunked, xs, h0, torch.float32, chunk_size=C), ref, 1e-5, f"fp32 C={C} T={T}")


@pytest.mark.parametrize("C", [1, 3, 16, 64])
def test_strong_decays_take_the_safe_path_exactly(C, monkeypatch):
    """w_raw ~ N(2, 1): log-decays down to ~ -150, a chunk's cumulative decay far beyond e^{-40}."""
    xs, h0 = make_inputs(T=2 * C + 7, w_raw_mean=2.0, seed=C)
    calls = []
    safe = chunked._wkv6_intra_safe
    monkeypatch.setattr(chunked, "_wkv6_intra_safe", lambda *a: calls.append(1) or safe(*a))
    ref = run(wkv6_recurrent, xs, h0)
    assert_match(run(wkv6_chunked, xs, h0, chunk_size=C), ref, 1e-12, f"fp64 strong C={C}")
    assert_match(run(wkv6_chunked, xs, h0, torch.float32, chunk_size=C), ref, 1e-5, f"fp32 strong C={C}")
    assert calls or C == 1  # C = 1: no chunk accumulates enough decay


@pytest.mark.parametrize("g", [0.0, -1e-7, -3.0, -60.0])
def test_constant_decay_edges(g):
    """No decay at all, decay ~1, and decays that empty the state within a token (e^-60)."""
    xs, h0 = make_inputs(T=3 * 16 + 5, g=g, seed=7)
    ref = run(wkv6_recurrent, xs, h0)
    for C in (16, 64):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            got = run(wkv6_chunked, xs, h0, dtype, chunk_size=C)
            if g == -60.0:
                # dw is ~e^-60 here, while the chunked form sums O(1) terms that cancel: compare it on the
                # scale of the other gradients (absolute), everything else relative as usual
                scale = ref[2][0].abs().max().item()
                assert (got[2][3].double() - ref[2][3]).abs().max().item() < tol * scale
                got = (got[0], got[1], [x for i, x in enumerate(got[2]) if i != 3] + [ref[2][3]])
                got[2].insert(3, got[2].pop())
            assert_match(got, ref, tol, f"{dtype} g={g} C={C}")


def test_head_size_64_and_scale():
    xs, h0 = make_inputs(B=1, T=70, H=1, K=64, V=64, seed=3)
    ref = run(wkv6_recurrent, xs, h0, scale=0.125)
    assert_match(run(wkv6_chunked, xs, h0, torch.float32, chunk_size=32, scale=0.125), ref, 1e-5, "N=64")
    o_scaled, o_plain = wkv6_chunked(*xs, scale=0.125)[0], wkv6_recurrent(*xs)[0]
    assert rel_rms(o_scaled, o_plain * 0.125) < 1e-12  # from a zero state, scale only scales the output


def test_two_tokens_by_hand():
    """K = V = 2 (fla layout: rows = key); the bonus u weighs the current token, the state earlier ones."""
    # t=1: h0 = 0; o1 = (r1·(u⊙k1)) v1 = (1·2·1) [2, 3] = [4, 6]; h1 = k1 v1ᵀ = [[2, 3], [0, 0]]
    # t=2: o2 = h1ᵀ r2 + (r2·(u⊙k2)) v2 = 1·[2, 3] + (2·3·1)[1, -1] = [8, -3]
    #      h2 = diag(.5, 1) h1 + k2 v2ᵀ = [[1, 1.5], [0, 0]] + [[0, 0], [1, -1]] = [[1, 1.5], [1, -1]]
    t = lambda *rows: torch.tensor(rows, dtype=torch.float64).view(1, 2, 1, 2)
    r, k, v = t([1, 1], [1, 2]), t([1, 0], [0, 1]), t([2, 3], [1, -1])
    w = t([math.log(0.5), 0], [math.log(0.5), 0])
    u = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    want_o = torch.tensor([[4.0, 6.0], [8.0, -3.0]], dtype=torch.float64)
    want_h = torch.tensor([[1.0, 1.5], [1.0, -1.0]], dtype=torch.float64)
    for backend in ("recurrent", "chunked"):
        o, h = wkv6(r, k, v, w, u, output_final_state=True, backend=backend)
        torch.testing.assert_close(o.view(2, 2), want_o, rtol=0, atol=1e-14)
        torch.testing.assert_close(h.view(2, 2), want_h, rtol=0, atol=1e-14)
        o_half, _ = wkv6(r, k, v, w, u, scale=0.5, backend=backend)
        torch.testing.assert_close(o_half.view(2, 2), want_o / 2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cu_seqlens_equals_separate_sequences(dtype, tol):
    lens = [5, 37, 0, 20, 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    xs, h0 = make_inputs(B=1, T=sum(lens), seed=11)
    h0 = torch.randn(len(lens), *h0.shape[1:], dtype=torch.float64)
    do, dh = torch.randn(1, sum(lens), 2, 6), torch.randn(len(lens), 2, 8, 6)
    packed = run(wkv6_chunked, xs, h0, dtype, chunk_size=16, cu_seqlens=cu, cotangents=(do, dh))
    ref = run(wkv6_recurrent, xs, h0, cu_seqlens=cu, cotangents=(do, dh))
    assert_match(packed, ref, tol, "packed vs recurrent")
    o, hT, grads = packed
    for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if hi == lo:
            torch.testing.assert_close(hT[i].double(), h0[i])  # empty sequence: state passes through
            continue
        seq = [x[:, lo:hi] for x in xs[:4]] + [xs[4]]
        one = run(
            wkv6_chunked, seq, h0[i : i + 1], dtype, chunk_size=16, cotangents=(do[:, lo:hi], dh[i : i + 1])
        )
        assert rel_rms(o[:, lo:hi], one[0]) < tol
        assert rel_rms(hT[i : i + 1], one[1]) < tol
        for g_packed, g_one in zip(grads[:4], one[2][:4], strict=True):
            assert rel_rms(g_packed[:, lo:hi], g_one) < tol
        assert rel_rms(grads[5][i : i + 1], one[2][5]) < tol


def test_split_with_carried_state_equals_one_pass():
    xs, h0 = make_inputs(B=2, T=50, seed=5)
    leaves = [x.clone().requires_grad_() for x in xs]
    r, k, v, w, u = leaves
    o, hT = wkv6_chunked(*leaves, initial_state=h0, output_final_state=True)
    first = [x[:, :21] for x in (r, k, v, w)]
    second = [x[:, 21:] for x in (r, k, v, w)]
    o1, h_mid = wkv6_chunked(*first, u, initial_state=h0, output_final_state=True)
    o2, h_end = wkv6_chunked(*second, u, initial_state=h_mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_end, hT, rtol=0, atol=1e-12)
    g_one = torch.autograd.grad(o.square().sum() + hT.sum(), leaves)
    g_two = torch.autograd.grad(torch.cat([o1, o2], 1).square().sum() + h_end.sum(), leaves)
    for x, y in zip(g_one, g_two, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-11)


@pytest.mark.parametrize("group_rows", [1, 40, 500])
def test_step_groups_and_shrinking_batch(monkeypatch, group_rows):
    """Several step groups, sequences ending inside a group and across groups, and an empty sequence."""
    monkeypatch.setattr(chunked, "_WKV6_GROUP_ROWS", group_rows)
    cu = torch.tensor([0, 3, 40, 40, 75, 140])
    xs, _ = make_inputs(B=1, T=140, seed=13)
    h0 = torch.randn(5, 2, 8, 6, dtype=torch.float64)
    ref = run(wkv6_recurrent, xs, h0, cu_seqlens=cu)
    assert_match(run(wkv6_chunked, xs, h0, chunk_size=16, cu_seqlens=cu), ref, 1e-12, f"groups={group_rows}")
    xs, h0 = make_inputs(B=3, T=45, seed=14)
    assert_match(run(wkv6_chunked, xs, h0, chunk_size=16), run(wkv6_recurrent, xs, h0), 1e-12, "batch")


def test_inference_path_equals_autograd_path():
    cu = torch.tensor([0, 9, 60, 61])
    xs, _ = make_inputs(B=1, T=61, seed=17)
    h0 = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        o, hT = wkv6_chunked(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_g, hT_g, _ = run(wkv6_chunked, xs, h0, cu_seqlens=cu)
    torch.testing.assert_close(o, o_g, rtol=0, atol=1e-13)
    torch.testing.assert_close(hT, hT_g, rtol=0, atol=1e-13)


def test_decode_step_equals_recurrence_token_by_token():
    xs, h0 = make_inputs(B=2, T=9, seed=19)
    o_ref, h_ref = wkv6_recurrent(*xs, initial_state=h0, output_final_state=True)
    h, outs = h0, []
    for t in range(9):
        o, h = wkv6_step(*(x[:, t : t + 1] for x in xs[:4]), xs[4], h)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-13)


def test_bf16_inputs_fp32_state():
    xs, h0 = make_inputs(B=1, T=40, H=2, K=64, V=64, seed=19)
    ref_o, ref_h = wkv6_recurrent(*xs, initial_state=h0, output_final_state=True)
    bf = [x.to(torch.bfloat16) for x in xs]
    bf[3] = xs[3].float()  # log-decay stays fp32 (decays near 1 would round to 1)
    o, hT = wkv6(*bf, initial_state=h0.float(), output_final_state=True, backend="chunked")
    assert o.dtype == torch.bfloat16 and hT.dtype == torch.float32
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(hT, ref_h) < 1e-2


def test_backends_agree_and_auto_is_chunked_on_cpu(monkeypatch):
    xs, h0 = make_inputs(seed=23)
    o_rec, h_rec = wkv6(*xs, initial_state=h0, output_final_state=True, backend="recurrent")
    o_chk, h_chk = wkv6(*xs, initial_state=h0, output_final_state=True, backend="chunked", chunk_size=32)
    torch.testing.assert_close(o_chk, o_rec, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_chk, h_rec, rtol=0, atol=1e-12)
    calls = []
    monkeypatch.setattr(wkv6_module, "wkv6_chunked", lambda *a, **kw: calls.append(kw) or (None, None))
    wkv6(*xs)
    assert calls == [{"chunk_size": wkv6_module.CHUNK_SIZE_DEFAULT}]


def test_raw_decay_convention():
    """BlinkDL's RWKV-6 kernels decay by exp(-exp(w_raw)); the op takes log-decay -exp(w_raw)."""
    w_raw = torch.linspace(-8, 3, 23, dtype=torch.float64)
    torch.testing.assert_close(raw_to_logdecay(w_raw).exp(), torch.exp(-torch.exp(w_raw)), rtol=1e-14, atol=0)
    assert raw_to_logdecay(w_raw.to(torch.bfloat16)).dtype == torch.float32


def _bad(**change):
    xs, h0 = make_inputs(B=1, T=6)
    args = dict(zip("rkvwu", xs, strict=True))
    kw = {}
    for key, val in change.items():
        (args if key in args else kw)[key] = val(args) if callable(val) else val
    return lambda: wkv6(*args.values(), **kw)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k=lambda a: a["k"][:, :, :, :4]), "k has shape"),
        (dict(v=lambda a: a["v"][:, :5]), "v has shape"),
        (dict(r=lambda a: a["r"][0]), "4-D"),
        (dict(u=lambda a: a["u"][0]), "u \\(the bonus\\) must be"),
        (dict(w=lambda a: a["w"].abs() + 0.1), "log-decay and must be finite and <= 0"),
        (dict(w=lambda a: torch.full_like(a["w"], -float("inf"))), "finite"),
        (dict(initial_state=torch.zeros(1, 2, 8, 6, dtype=torch.bfloat16)), "float32"),
        (dict(initial_state=torch.zeros(1, 2, 6, 8)), "expected \\[N, H, K, V\\]"),
        (dict(backend="triton"), "unknown backend"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5])), "must rise from 0 to T=6"),
        (dict(cu_seqlens=torch.tensor([0.0, 6.0])), "integer"),
    ],
)
def test_bad_input_is_a_clear_error(change, match):
    with pytest.raises(Wkv6InputError, match=match):
        _bad(**change)()


def test_bad_input_batch_with_cu_seqlens_and_fla_on_cpu():
    xs, _ = make_inputs(B=2, T=6)
    with pytest.raises(Wkv6InputError, match="batch size 1"):
        wkv6(*xs, cu_seqlens=torch.tensor([0, 6]))
    assert issubclass(Wkv6InputError, ArwkvError) and issubclass(Wkv6InputError, ValueError)
    if not torch.cuda.is_available():
        with pytest.raises(Wkv6InputError, match="backend='fla' needs CUDA"):
            wkv6(*xs, backend="fla")


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    xs = [x.requires_grad_() for x in make_inputs(B=1, T=40, seed=37)[0]]
    ref = torch.autograd.grad(wkv6_recurrent(*xs)[0].square().sum(), xs)
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss = torch.utils.checkpoint.checkpoint(
        lambda *x: wkv6_chunked(*x)[0].square().sum(), *leaves, use_reentrant=reentrant
    )
    loss.backward()
    for x, g in zip(leaves, ref, strict=True):
        assert rel_rms(x.grad, g) < 1e-12


def test_chunked_ignores_an_enclosing_cpu_autocast():
    xs, h0 = make_inputs(B=2, T=37, H=2, K=16, V=16, seed=5)
    xs = [x.float() for x in xs]

    def go(autocast: bool):
        leaves = [x.clone().requires_grad_() for x in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, hT = wkv6(*leaves, initial_state=h0.float(), output_final_state=True, backend="chunked")
            (o.sum() + hT.square().sum()).backward()
        return [o, hT, *(x.grad for x in leaves)]

    for got, ref in zip(go(True), go(False), strict=True):
        assert got.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
