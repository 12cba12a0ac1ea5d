"""The student model: mixer math against an independent recurrence, cached generation against full forwards,
padding, packed documents, cache save/restore, save/load with and without remote code."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from arwkv.convert import build_student
from arwkv.convert.families import tiny_teacher
from arwkv.models import ArwkvCache, ArwkvForCausalLM
from arwkv.models.arwkv.modeling_arwkv import ArwkvTimeMix6, wkv6_chunked, wkv6_step, wkv7_chunked, wkv7_step

MU = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
MU6 = tuple(f"time_maa_{n}" for n in ("x", "w", "k", "v", "r", "g"))


@torch.no_grad()
def activate(student: ArwkvForCausalLM, seed: int = 1) -> ArwkvForCausalLM:
    """Randomize the mixer tensors the copy init leaves at special values (mu = 0, g1 = 0, ...), so that
    token shift, LoRAs, value residual and bonus all contribute."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype)
    for layer in student.model.layers:
        m = layer.self_attn
        if not layer.is_rwkv:
            continue
        if isinstance(m, ArwkvTimeMix6):
            activate6(m, g)
            continue
        for name in MU if m.use_token_shift else ():
            getattr(m, name).copy_(torch.rand(getattr(m, name).shape, generator=g))
        for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            if hasattr(m, name):
                getattr(m, name).add_(rnd(getattr(m, name)) * 0.2)
        for name in ("v0", "a0", "k_a", "r_k"):
            getattr(m, name).add_(rnd(getattr(m, name)) * 0.5)
        if m.local_attn is not None:  # the RWKV branch starts switched off beside the local attention
            m.state_gain.copy_(1 + rnd(m.state_gain) * 0.5)
    return student


def activate6(m: ArwkvTimeMix6, g: torch.Generator) -> None:
    """The RWKV-6 counterpart: copy init zeroes every token-shift mix and its LoRA."""
    rnd = lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype)
    for name in MU6 if m.use_token_shift else ():
        getattr(m, name).copy_(torch.rand(getattr(m, name).shape, generator=g))
    for name in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"):
        if hasattr(m, name):
            getattr(m, name).add_(rnd(getattr(m, name)) * 0.2)
    for name in ("time_decay", "time_faaaa"):  # the qrwkv form has no bonus
        if hasattr(m, name):
            getattr(m, name).add_(rnd(getattr(m, name)) * 0.5)
    if m.gate is not None:
        m.gate.weight.add_(rnd(m.gate.weight) * 0.2)
    m.output.weight.add_(rnd(m.output.weight) * 0.1)  # fresh init starts it at 0
    if m.local_attn is not None:
        m.state_gain.copy_(1 + rnd(m.state_gain) * 0.5)


def student_for(model_type: str = "llama", seed: int = 0, init: str = "copy", **options) -> ArwkvForCausalLM:
    student = activate(build_student(tiny_teacher(model_type, seed=seed), init=init, **options)).eval()
    student.generation_config.eos_token_id = None  # fixed-length generations, comparable token by token
    return student


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------------------------------------
# The mixer against an independent token-by-token implementation of method.md §2 (BlinkDL layout, fp64)


def reference_mixer(m, x: torch.Tensor, v_first: torch.Tensor | None):
    B, T, C = x.shape
    H, N = m.num_heads, m.head_size
    S = x.new_zeros(B, H, N, N)  # rows = value index, columns = key index
    x_prev = x.new_zeros(B, C)
    outs, vfs = [], []
    lin = lambda layer, z: F.linear(z, layer.weight, layer.bias)
    for t in range(T):
        xt = x[:, t]
        xx = x_prev - xt
        x_prev = xt
        xr, xw, xk, xv, xa, xg = (xt + xx * getattr(m, n)[0, 0] for n in MU)
        r, k, v = lin(m.receptance, xr), lin(m.key, xk), lin(m.value, xv)
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(m.w0[0, 0] + torch.tanh(xw @ m.w1) @ m.w2))
        if m.is_first:
            vfs.append(v)
        else:
            v = v + (v_first[:, t] - v) * torch.sigmoid(m.v0[0, 0] + (xv @ m.v1) @ m.v2)
        eta = torch.sigmoid(m.a0[0, 0] + (xa @ m.a1) @ m.a2)
        kk = (k * m.k_k[0, 0]).view(B, H, N)
        kk = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k * (1 + (eta - 1) * m.k_a[0, 0])
        rh, kh, vh, wh, eh = (z.view(B, H, N) for z in (r, k, v, w, eta))
        # S <- S (diag(w) - kk (eta*kk)^T) + v k^T ; y = S r
        S = (
            S * wh[:, :, None, :]
            - (S @ kk[..., None]) @ (eh * kk)[:, :, None, :]
            + vh[..., None] * kh[:, :, None]
        )
        y = (S @ rh[..., None])[..., 0]
        if m.ln_x is not None:
            mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
            y = (y - mean) / torch.sqrt(var + m.ln_x.eps)
            y = y * m.ln_x.weight.view(H, N) + m.ln_x.bias.view(H, N)
        y = y + (rh * kh * m.r_k).sum(-1, keepdim=True) * vh
        y = y.reshape(B, -1)
        if hasattr(m, "g1"):
            y = y * (torch.sigmoid(xg @ m.g1) @ m.g2)
        outs.append(lin(m.output, y))
    return torch.stack(outs, 1), (torch.stack(vfs, 1) if vfs else v_first)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_group_norm": False, "use_gate": False},
        {"head_size": 4, "lora_ranks": {"w": 8, "a": 4, "v": 4, "g": 8}},
    ],
)
def test_mixer_matches_independent_recurrence(options):
    student = student_for("qwen2", **options).double()  # qwen2: r/k/v biases too
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    first, second = student.model.layers[0].self_attn, student.model.layers[1].self_attn
    out0, vf, state0 = first(x)
    ref0, ref_vf = reference_mixer(first, x, None)
    torch.testing.assert_close(out0, ref0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vf, ref_vf)
    x1 = torch.randn_like(x)
    out1, vf1, _ = second(x1, vf)
    torch.testing.assert_close(out1, reference_mixer(second, x1, vf)[0], rtol=1e-10, atol=1e-10)
    assert vf1 is vf  # only the first RWKV layer sets v_first
    assert state0[0].shape == (2, 32) and state0[1].dtype == torch.float64


def test_mixer_requires_v_first_after_first_layer():
    student = student_for()
    with pytest.raises(ValueError, match="v_first"):
        student.model.layers[1].self_attn(torch.randn(1, 3, 32))


def reference_mixer6(m, x: torch.Tensor):
    """RWKV-6 time mixing token by token, written from the published design (fp64): ddlerp token shift,
    decay exp(-exp(w0 + tanh(x_w W1) W2)), y_t = r_t (S + diag(u) k_tᵀ v_t), S <- diag(w_t) S + k_tᵀ v_t,
    GroupNorm (eps 64e-5), out = W_o (y * silu(W_g x_g))."""
    B, T, C = x.shape
    H, N = m.num_heads, m.head_size
    S = x.new_zeros(B, H, N, N)  # [key, value]
    x_prev = x.new_zeros(B, C)
    lin = lambda layer, z: F.linear(z, layer.weight, layer.bias)
    outs = []
    for t in range(T):
        xt = x[:, t]
        xx = x_prev - xt
        x_prev = xt
        if m.use_token_shift:
            lora = torch.tanh((xt + xx * m.time_maa_x[0, 0]) @ m.time_maa_w1).view(B, 5, -1)
            dyn = [lora[:, i] @ m.time_maa_w2[i] for i in range(5)]
            mus = [getattr(m, f"time_maa_{n}")[0, 0] for n in "wkvrg"]
            xw, xk, xv, xr, xg = (xt + xx * (mu + d) for mu, d in zip(mus, dyn, strict=True))
        else:
            xw = xk = xv = xr = xg = xt
        r, k, v = lin(m.receptance, xr), lin(m.key, xk), lin(m.value, xv)
        decay = torch.exp(-torch.exp(m.time_decay[0, 0] + torch.tanh(xw @ m.time_decay_w1) @ m.time_decay_w2))
        rh, kh, vh, wh = (z.view(B, H, N) for z in (r, k, v, decay))
        kv = kh[..., :, None] * vh[..., None, :]
        y = (rh[..., None, :] @ (S + m.time_faaaa[..., None] * kv))[..., 0, :]  # [B, H, N(value)]
        S = wh[..., None] * S + kv
        if m.ln_x is not None:
            mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
            y = (y - mean) / torch.sqrt(var + 64e-5)
            y = y * m.ln_x.weight.view(H, N) + m.ln_x.bias.view(H, N)
        y = y.reshape(B, -1)
        if m.gate is not None:
            y = y * F.silu(xg @ m.gate.weight.T)
        outs.append(lin(m.output, y))
    return torch.stack(outs, 1)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_group_norm": False, "use_gate": False, "use_token_shift": False},
        {"head_size": 4, "lora_ranks": {"w": 8, "mix": 4}},
    ],
)
@pytest.mark.parametrize("init", ["copy", "fresh"])
def test_mixer6_matches_independent_recurrence(options, init):
    student = student_for("qwen2", init=init, version=6, **options).double()  # qwen2: r/k/v biases too
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    for layer in student.model.layers[:2]:
        m = layer.self_attn
        assert isinstance(m, ArwkvTimeMix6)
        out, vf, state = m(x, None)
        torch.testing.assert_close(out, reference_mixer6(m, x), rtol=1e-10, atol=1e-10)
        assert vf is None and state[1].dtype == torch.float64  # no value residual in RWKV-6
        assert (state[0] is None) == (not m.use_token_shift)
    if "lora_ranks" in options:
        assert m.time_decay_w1.shape == (32, 8) and m.time_maa_w2.shape == (5, 4, 32) and m.num_heads == 8


def reference_mixer_qrwkv(m, x: torch.Tensor):
    """The QRWKV6 form token by token, written from llama.cpp's rwkv6qwen2 graph (fp64): ddlerp token shift,
    decay w_t = exp(-exp(w0 + tanh(x_w W1) W2)), k_t <- k_t (1 - w_t), S <- diag(w_t) S + k_tᵀ v_t, then
    y_t = N^-1/2 r_t S (the state after this token's write; no bonus, no GroupNorm),
    out = W_o (y * sigmoid(W_g x_g))."""
    B, T, C = x.shape
    H, N = m.num_heads, m.head_size
    S = x.new_zeros(B, H, N, N)
    x_prev = x.new_zeros(B, C)
    lin = lambda layer, z: F.linear(z, layer.weight, layer.bias)
    outs = []
    for t in range(T):
        xt, xx = x[:, t], x_prev - x[:, t]
        x_prev = xt
        lora = torch.tanh((xt + xx * m.time_maa_x[0, 0]) @ m.time_maa_w1).view(B, 5, -1)
        mixed = [
            xt + xx * (getattr(m, f"time_maa_{n}")[0, 0] + lora[:, i] @ m.time_maa_w2[i])
            for i, n in enumerate("wkvrg")
        ]
        xw, xk, xv, xr, xg = mixed
        decay = torch.exp(-torch.exp(m.time_decay[0, 0] + torch.tanh(xw @ m.time_decay_w1) @ m.time_decay_w2))
        r, k, v = lin(m.receptance, xr), lin(m.key, xk) * (1 - decay), lin(m.value, xv)
        rh, kh, vh, wh = (z.view(B, H, N) for z in (r, k, v, decay))
        S = wh[..., None] * S + kh[..., :, None] * vh[..., None, :]
        y = (rh[..., None, :] @ S)[..., 0, :] * N**-0.5
        y = y.reshape(B, -1) * torch.sigmoid(xg @ m.gate.weight.T)
        outs.append(lin(m.output, y))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("init", ["copy", "fresh"])
@pytest.mark.parametrize("head_size", [None, 4])
def test_qrwkv_mixer_matches_rwkv6qwen2_recurrence(init, head_size):
    student = student_for("qwen2", init=init, version=6, rwkv6_variant="qrwkv", head_size=head_size)
    student = student.double()  # student_for moves every mixer tensor away from its init
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    for layer in student.model.layers[:2]:
        m = layer.self_attn
        assert m.qrwkv and m.ln_x is None and not hasattr(m, "time_faaaa")
        assert (m.key.bias is not None) == (init == "copy")  # qwen2's k bias, copied
        out, vf, state = m(x, None)
        torch.testing.assert_close(out, reference_mixer_qrwkv(m, x), rtol=1e-10, atol=1e-10)


def test_v6_copy_init_copies_projections_and_disables_token_shift():
    teacher = tiny_teacher("qwen2", seed=0)  # GQA: 4 query heads over 2 KV heads
    student = build_student(teacher, init="copy", version=6)
    attn, m = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    assert torch.equal(m.receptance.weight, attn.q_proj.weight) and torch.equal(
        m.output.weight, attn.o_proj.weight
    )
    kv, hd = teacher.config.num_key_value_heads, m.teacher_head_dim
    groups = teacher.config.num_attention_heads // kv
    want_k = (
        attn.k_proj.weight.view(kv, hd, -1)
        .repeat_interleave(groups, 0)
        .reshape(-1, attn.k_proj.weight.shape[1])
    )
    assert torch.equal(m.key.weight, want_k) and torch.equal(
        m.key.bias.view(-1, hd)[1], attn.k_proj.bias.view(-1, hd)[0]
    )
    assert all(not getattr(m, n).any() for n in (*MU6, "time_maa_w2"))
    assert m.ln_x is not None  # RWKV-6's GroupNorm, copy or fresh
    assert build_student(teacher, init="fresh", version=6).model.layers[0].self_attn.ln_x is not None
    # the BlinkDL init of the decay: log-decay -exp(w) spans slow to fast channels
    w = m.time_decay.detach().flatten()
    assert float(w.min()) == pytest.approx(-6.0) and -1.5 < float(w.max()) < -0.5


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(version=6, head_size=5), "head_size 5 must divide the mixer width 32"),
        (dict(version=5), "version must be 6 \\(RWKV-6\\) or 7"),
        (dict(version="six"), "version must be 6 \\(RWKV-6\\) or 7"),
        (dict(version=6, lora_ranks={"q": 4}), "lora_ranks keys must be among"),
        (dict(rwkv6_variant="qrwkv"), "is a form of the RWKV-6 mixer: set version=6"),
        (dict(version=6, rwkv6_variant="qrwkv", use_group_norm=True), "has no GroupNorm"),
        (dict(version=6, rwkv6_variant="eagle"), "rwkv6_variant must be one of"),
    ],
)
def test_v6_option_the_teacher_cannot_take_is_one_clear_line(options, match):
    with pytest.raises(ValueError, match=match) as err:
        build_student(tiny_teacher("llama", seed=0), init="copy", **options)
    assert "\n" not in str(err.value)


def test_decode_step6_equals_chunked_kernel():
    B, H, K, V = 2, 3, 8, 5
    r, k, v = torch.randn(B, 1, H, K), torch.randn(B, 1, H, K), torch.randn(B, 1, H, V)
    w, u, h0 = -torch.rand(B, 1, H, K) * 3, torch.randn(H, K), torch.randn(B, H, K, V)
    o1, s1 = wkv6_step(r, k, v, w, u, h0)
    o2, s2 = wkv6_chunked(r, k, v, w, u, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


def test_decode_step_equals_chunked_kernel():
    B, H, K = 2, 3, 8
    r, k, v, a = (torch.randn(B, 1, H, K) for _ in range(4))
    kk = F.normalize(torch.randn(B, 1, H, K), dim=-1)
    a, b = -kk, kk * torch.rand(B, 1, H, K)
    w = -0.6 * torch.rand(B, 1, H, K)
    h0 = torch.randn(B, H, K, K)
    o1, s1 = wkv7_step(r, w, k, v, a, b, h0)
    o2, s2 = wkv7_chunked(r, w, k, v, a, b, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


def test_value_residual_gradient_flows_into_first_layer():
    student = student_for()
    x0, x1 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    outs = student.mixer_outputs({0: x0, 1: x1})
    outs[1].square().sum().backward()
    first = student.model.layers[0].self_attn
    assert first.value.weight.grad is not None and first.value.weight.grad.abs().sum() > 0  # only via v_first
    assert first.output.weight.grad is None


@pytest.mark.parametrize("version", [7, 6])
def test_mixer_outputs_match_model_internals(version):
    student = student_for(softmax_layers=[1], version=version)
    ids = ids_for(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    inputs, outputs = {}, {}
    hooks = []
    for i in student.config.rwkv_layers:
        layer = student.model.layers[i]
        hooks.append(
            layer.input_layernorm.register_forward_hook(lambda mod, a, o, i=i: inputs.__setitem__(i, o))
        )
        hooks.append(
            layer.self_attn.register_forward_hook(lambda mod, a, o, i=i: outputs.__setitem__(i, o[0]))
        )
    with torch.no_grad():
        student(ids, attention_mask=mask)
        replay = student.mixer_outputs(inputs, attention_mask=mask)
    for h in hooks:
        h.remove()
    for i in student.config.rwkv_layers:
        torch.testing.assert_close(replay[i], outputs[i], rtol=0, atol=0)


# -----------------------------------------------------------------------------------------------------------
# Cached inference == full forward


STUDENTS = {  # name: (teacher family, init, options)
    "rwkv": ("llama", "copy", dict()),
    "hybrid": ("llama", "copy", dict(softmax_layers=[1])),
    "rope+qknorm": ("qwen3", "copy", dict(use_rope=True)),  # qwen3: carried q/k norms
    # a 3-token window + 1 sink inside every mixer: the kept keys are cropped after a few tokens
    "local-window": ("llama", "copy", dict(local_window=3, local_sinks=1)),
    # RWKV-6 students: each teacher family, both inits, a hybrid
    "rwkv6-llama-copy": ("llama", "copy", dict(version=6)),
    "rwkv6-qwen2-fresh": ("qwen2", "fresh", dict(version=6)),
    "rwkv6-qwen3-copy-rope": ("qwen3", "copy", dict(version=6, use_rope=True)),
    "rwkv6-hybrid-fresh": ("llama", "fresh", dict(version=6, softmax_layers=[1])),
    "rwkv6-local-window": ("llama", "copy", dict(version=6, local_window=3, local_sinks=1)),
    "qrwkv6-qwen2-copy": ("qwen2", "copy", dict(version=6, rwkv6_variant="qrwkv")),
    "qrwkv6-hybrid-fresh": ("llama", "fresh", dict(version=6, rwkv6_variant="qrwkv", softmax_layers=[1])),
}


@pytest.fixture(params=list(STUDENTS), scope="module")
def student(request):
    model_type, init, options = STUDENTS[request.param]
    return student_for(model_type, init=init, **options)


@pytest.mark.parametrize("prefill_chunk", [None, 3, 1])
def test_prefill_then_decode_equals_full_forward(student, prefill_chunk):
    T, N = 7, 5
    ids = ids_for(2, T + N)
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        cache = ArwkvCache(student.config)
        chunk = prefill_chunk or T
        pieces = [student(ids[:, s : min(s + chunk, T)], cache=cache).logits for s in range(0, T, chunk)]
        steps = [student(ids[:, T + i : T + i + 1], cache=cache).logits for i in range(N)]
    cached = torch.cat(pieces + steps, dim=1)
    assert cache.get_seq_length() == T + N
    assert (cached - full).abs().max() < 1e-4


def greedy_reference(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with a full forward (no cache) per token."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("prefill_chunk_size", [None, 2])
def test_generate_greedy_equals_uncached_greedy(student, prefill_chunk_size):
    ids = ids_for(2, 6)
    out = student.generate(
        ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=prefill_chunk_size, pad_token_id=0
    )
    assert torch.equal(out, greedy_reference(student, ids, 6))


def test_beam_search_equals_uncached_beam_search(student):
    ids = ids_for(2, 5)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(student.generate(ids, **kwargs), student.generate(ids, use_cache=False, **kwargs))


def left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :], mask[i, n - len(p) :] = p, 1
    return ids, mask


def test_left_padded_batch_generates_as_each_prompt_alone(student):
    prompts = [ids_for(1, n, seed=n)[0] for n in (5, 8, 3)]
    ids, mask = left_pad(prompts)
    batched = student.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = student.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(p) :]), f"prompt {i}"


def test_left_padding_leaves_logits_unchanged(student):
    student = copy.deepcopy(student).double()  # fp64: padding must change nothing but rounding
    prompts = [ids_for(1, n, seed=n)[0] for n in (6, 3)]
    ids, mask = left_pad(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() makes them (RoPE on r/k needs them)
    with torch.no_grad():
        batched = student(ids, attention_mask=mask, position_ids=positions).logits
        alone = student(prompts[1][None]).logits
    assert (batched[1, -3:] - alone[0]).abs().max() < 1e-10


def test_sampling(student):
    ids = ids_for(2, 4)
    kwargs = dict(
        do_sample=True, top_k=20, temperature=0.8, num_return_sequences=2, max_new_tokens=5, pad_token_id=0
    )
    torch.manual_seed(3)
    a = student.generate(ids, **kwargs)
    torch.manual_seed(3)
    b = student.generate(ids, **kwargs)
    assert a.shape == (4, 9) and torch.equal(a, b)
    assert torch.equal(a[::2, :4], ids) and bool(((a >= 0) & (a < 100)).all())


def test_cache_save_restore_continues_conversation(student, tmp_path):
    ids = ids_for(2, 5)
    cache = ArwkvCache(student.config)
    first = student.generate(ids, max_new_tokens=4, do_sample=False, cache=cache, pad_token_id=0)
    assert cache.get_seq_length() == first.shape[1] - 1  # the last sampled token is not fed yet
    cache.save(tmp_path / "state.safetensors")
    restored = ArwkvCache.load(tmp_path / "state.safetensors")
    conversation = torch.cat([first, ids_for(2, 3, seed=9)], dim=1)  # the user's next turn
    continued = student.generate(
        conversation, max_new_tokens=4, do_sample=False, cache=restored, pad_token_id=0
    )
    from_scratch = student.generate(conversation, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, from_scratch)


# -----------------------------------------------------------------------------------------------------------
# Packed documents


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(softmax_layers=[1]),
        dict(local_window=3, local_sinks=1),
        dict(version=6),
        dict(version=6, softmax_layers=[1]),
        dict(version=6, rwkv6_variant="qrwkv"),
    ],
)
def test_packed_position_ids_reset_state(options):
    # fp64, so that a leak across documents cannot hide in rounding: fp32 results differ by ~1e-5 between a
    # 10-token row and a 4-token one (BLAS and vector-lane rounding depend on the shapes and the CPU). SDPA
    # keeps the kept softmax layers in fp64; transformers' eager attention takes its softmax in fp32.
    student, tol = student_for(**options).double(), 1e-10
    student.config._attn_implementation = "sdpa"
    docs = [[ids_for(1, 4, 1)[0], ids_for(1, 6, 2)[0]], [ids_for(1, 7, 3)[0], ids_for(1, 3, 4)[0]]]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    with torch.no_grad():
        packed = student(ids, position_ids=pos, use_cache=False).logits
        for b, row in enumerate(docs):
            start = 0
            for d in row:
                alone = student(d[None], use_cache=False).logits[0]
                assert (packed[b, start : start + len(d)] - alone).abs().max() < tol
                start += len(d)


@pytest.mark.parametrize("version", [7, 6])
def test_packed_prefill_carries_last_document_state(version):
    student = student_for(version=version)
    a, b, nxt = ids_for(1, 5, 1), ids_for(1, 4, 2), ids_for(1, 1, 3)
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        out = student(torch.cat([a, b], 1), position_ids=pos, use_cache=True)  # packed: a | b
        step = student(nxt, position_ids=torch.tensor([[4]]), cache=out.cache).logits
        alone = student(torch.cat([b, nxt], 1), use_cache=False).logits[:, -1:]
    assert (step - alone).abs().max() < 1e-5


# -----------------------------------------------------------------------------------------------------------
# Save / load


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_save_pretrained_writes_remote_code_and_reloads(tmp_path):
    student = student_for(softmax_layers=[2])
    student.save_pretrained(tmp_path, tokenizer=tiny_tokenizer())
    for name in ("config.json", "model.safetensors", "modeling_arwkv.py", "configuration_arwkv.py"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_arwkv.ArwkvConfig",
        "AutoModelForCausalLM": "modeling_arwkv.ArwkvForCausalLM",
    }
    assert config["model_type"] == "arwkv" and config["teacher_config"]["model_type"] == "llama"
    # arwkv installed: no remote code. The same attention kernel as the student for bit-equal logits.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded) is ArwkvForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = ids_for(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("init", ["copy", "fresh"])
def test_v6_each_family_and_init_decodes_and_pads_like_the_full_forward(model_type, init):
    """Every teacher family x init (the STUDENTS matrix covers a subset with the whole generation suite)."""
    student = student_for(model_type, init=init, version=6, use_rope=model_type == "qwen3").double()
    ids = ids_for(2, 12)
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        cache = ArwkvCache(student.config)
        pieces = [student(ids[:, :7], cache=cache).logits]
        pieces += [student(ids[:, t : t + 1], cache=cache).logits for t in range(7, 12)]
        assert (torch.cat(pieces, 1) - full).abs().max() < 1e-10
        prompts = [ids_for(1, n, seed=n)[0] for n in (6, 3)]
        padded, mask = left_pad(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = student(padded, attention_mask=mask, position_ids=positions).logits
        alone = student(prompts[1][None]).logits
    assert (batched[1, -3:] - alone[0]).abs().max() < 1e-10


REMOTE_CODE_SCRIPT = """
import sys
sys.modules["arwkv"] = None  # `import arwkv` now fails: only the checkpoint's own code can load it
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager")
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
torch.save({"logits": logits, "module": type(model).__module__}, sys.argv[3])
"""


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("init", ["copy", "fresh"])
def test_v6_student_saves_and_reloads_identical_also_as_remote_code(model_type, init, tmp_path):
    student = student_for(model_type, init=init, version=6, softmax_layers=[2])
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["version"] == 6
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded) is ArwkvForCausalLM and isinstance(loaded.model.layers[0].self_attn, ArwkvTimeMix6)
    ids = ids_for(2, 8)
    with torch.no_grad():
        want = student(ids).logits
        assert torch.equal(loaded(ids).logits, want)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "run.py").write_text(REMOTE_CODE_SCRIPT)
    cmd = [
        sys.executable,
        str(tmp_path / "run.py"),
        str(tmp_path),
        str(tmp_path / "ids.pt"),
        str(tmp_path / "o.pt"),
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    result = torch.load(tmp_path / "o.pt")
    assert result["module"].startswith("transformers_modules")
    assert torch.equal(result["logits"], want)


FRESH_VENV_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager")
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "generated": out, "module": type(model).__module__}, sys.argv[3])
"""


@pytest.mark.slow
def test_trust_remote_code_in_fresh_virtualenv(tmp_path):
    """A virtualenv with only torch + transformers (no arwkv) loads the saved student as remote code."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "torch==2.13.0",
        "transformers==5.24.0",
    ]
    subprocess.run(pip, check=True)
    student = student_for(softmax_layers=[1])
    student.save_pretrained(tmp_path / "student")
    ids = ids_for(2, 6)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "run.py").write_text(FRESH_VENV_SCRIPT)
    cmd = [str(venv / "bin" / "python"), str(tmp_path / "run.py"), str(tmp_path / "student")]
    subprocess.run([*cmd, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules")
    with torch.no_grad():  # here `auto` on CPU is the native kernel: equal up to fp32 rounding
        torch.testing.assert_close(result["logits"], student(ids).logits, rtol=1e-5, atol=1e-5)
    # without the arwkv package it is the chunked kernel: bit for bit what the chunked kernel gives here
    for module in student.modules():
        if hasattr(module, "backend"):
            module.backend = "chunked"
    with torch.no_grad():
        assert torch.equal(result["logits"], student(ids).logits)
    assert torch.equal(
        result["generated"], student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    )


def test_unknown_teacher_in_config_is_a_clear_error():
    from arwkv.models import ArwkvConfig

    config = ArwkvConfig(
        teacher_config={
            "model_type": "gpt2",
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "hidden_size": 8,
        }
    )
    with pytest.raises(ValueError, match="supported"):
        ArwkvForCausalLM(config)


@pytest.mark.parametrize("reentrant,version", [(True, 7), (False, 7), (False, 6)])
def test_training_step_with_gradient_checkpointing_matches_plain(reentrant, version):
    ids = ids_for(2, 10)
    grads = []
    for checkpointing in (False, True):
        student = student_for(softmax_layers=[1], version=version).train()
        if checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        loss = student(ids, labels=ids).loss
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert f"model.layers.0.self_attn.{'w1' if version == 7 else 'time_decay_w1'}" in grads[0]  # mixers train
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
