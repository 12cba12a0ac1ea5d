"""Test-side ground truth for `rwkv_hybrid` checkpoints with `wkv_version: 6` (RWKV-6 mixers).

Written from the RWKV-6 time-mixing equations (BlinkDL's x060 layout, as arwkv.interop.rwkv_hybrid documents
the version-6 tensor names), not from arwkv's code:

* `make_hybrid6`: a tiny random checkpoint in that key layout (Qwen2 attention outside `wkv_layers`);
* `reference_logits6`: the forward one token at a time in fp64 — ddlerp token shift, decay exp(-exp(w)),
  y = r · (S + diag(u) kᵀv), S <- diag(decay) S + kᵀv, GroupNorm, SiLU gate — with Qwen2 RMSNorm / MLP.
"""

from __future__ import annotations

import torch
from hybrid_fixtures import HEAD, _attention, _rms, hybrid_config, rwkv_layer_ids

Tensor = torch.Tensor
MIX_RANK, DECAY_RANK = 32, 64  # RWKV-6's LoRA ranks below width 4096


def hybrid_config6(**kw) -> dict:
    cfg = hybrid_config(**kw)
    cfg.update(wkv_version=6, wkv_use_vfirst=False)
    return cfg


def make_hybrid6(cfg: dict, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    C, V, F = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    H = C // HEAD
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = C // nh

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    def uni(*shape: int, lo: float, hi: float) -> Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: dict[str, Tensor] = {
        "model.embed_tokens.weight": rnd(V, C),
        "model.norm.weight": uni(C, lo=0.5, hi=1.5),
    }
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rnd(V, C, scale=C**-0.5)
    wkv = set(rwkv_layer_ids(cfg))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = uni(C, lo=0.5, hi=1.5)
        sd[p + "post_attention_layernorm.weight"] = uni(C, lo=0.5, hi=1.5)
        sd[p + "mlp.gate_proj.weight"] = rnd(F, C, scale=C**-0.5)
        sd[p + "mlp.up_proj.weight"] = rnd(F, C, scale=C**-0.5)
        sd[p + "mlp.down_proj.weight"] = rnd(C, F, scale=F**-0.5)
        if i not in wkv:
            a = p + "self_attn."
            for n, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                sd[a + f"{n}_proj.weight"] = rnd(rows, C, scale=C**-0.5)
                sd[a + f"{n}_proj.bias"] = rnd(rows, scale=0.1)
            sd[a + "o_proj.weight"] = rnd(C, nh * hd, scale=(nh * hd) ** -0.5)
            continue
        t = p + "self_attn.time_mixer."
        for m in "xwkvr" + ("g" if cfg["wkv_has_gate"] else ""):
            sd[t + f"time_maa_{m}"] = uni(1, 1, C, lo=0.0, hi=1.0)
        sd[t + "time_maa_w1"] = rnd(C, 5 * MIX_RANK, scale=0.5 * C**-0.5)
        sd[t + "time_maa_w2"] = rnd(5, MIX_RANK, C, scale=0.3 * MIX_RANK**-0.5)
        sd[t + "time_decay"] = uni(1, 1, C, lo=-6.0, hi=1.0)  # decays from ~1 to ~e^-e
        sd[t + "time_decay_w1"] = rnd(C, DECAY_RANK, scale=0.5 * C**-0.5)
        sd[t + "time_decay_w2"] = rnd(DECAY_RANK, C, scale=0.5 * DECAY_RANK**-0.5)
        sd[t + "time_faaaa"] = rnd(H, HEAD, scale=0.5)
        for name in ("receptance", "key", "value", "output") + (("gate",) if cfg["wkv_has_gate"] else ()):
            sd[t + f"{name}.weight"] = rnd(C, C, scale=C**-0.5)
        if cfg["wkv_has_group_norm"]:
            sd[t + "ln_x.weight"] = uni(C, lo=0.5, hi=1.5)
            sd[t + "ln_x.bias"] = rnd(C, scale=0.1)
    return sd


def _time_mix6(p: dict[str, Tensor], x: Tensor, st: dict, cfg: dict) -> Tensor:
    C = x.shape[0]
    H, N = C // HEAD, HEAD
    xx = st["shift"] - x
    st["shift"] = x.clone()
    lora = torch.tanh((x + xx * p["time_maa_x"].reshape(C)) @ p["time_maa_w1"]).reshape(5, -1)
    mix = {}
    for j, m in enumerate("wkvrg"):
        mu = p[f"time_maa_{m}"].reshape(C) if f"time_maa_{m}" in p else torch.zeros(C, dtype=x.dtype)
        mix[m] = x + xx * (mu + lora[j] @ p["time_maa_w2"][j])
    r = p["receptance.weight"] @ mix["r"]
    k = p["key.weight"] @ mix["k"]
    v = p["value.weight"] @ mix["v"]
    w = p["time_decay"].reshape(C) + torch.tanh(mix["w"] @ p["time_decay_w1"]) @ p["time_decay_w2"]
    decay = torch.exp(-torch.exp(w))
    y = torch.zeros(C, dtype=x.dtype)
    S = st["S"]  # [H, key, value]
    for h in range(H):
        sl = slice(h * N, (h + 1) * N)
        kv = torch.outer(k[sl], v[sl])  # [key, value]
        y[sl] = r[sl] @ (S[h] + p["time_faaaa"][h][:, None] * kv)  # the state before this token, + bonus
        S[h] = decay[sl][:, None] * S[h] + kv
    if "ln_x.weight" in p:
        eps = 1e-5 * cfg["head_size_divisor"] ** 2
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            mu = y[sl].mean()
            var = ((y[sl] - mu) ** 2).mean()
            y[sl] = (y[sl] - mu) / torch.sqrt(var + eps) * p["ln_x.weight"][sl] + p["ln_x.bias"][sl]
    if cfg["wkv_has_gate"]:
        y = y * torch.nn.functional.silu(p["gate.weight"] @ mix["g"])
    return p["output.weight"] @ y


def reference_logits6(cfg: dict, sd: dict[str, Tensor], ids: list[int]) -> Tensor:
    """Logits [T, vocab] of a version-6 rwkv_hybrid model for one sequence, token by token in fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    C, H, L = cfg["hidden_size"], cfg["hidden_size"] // HEAD, cfg["num_hidden_layers"]
    eps = cfg["rms_norm_eps"]
    wkv = set(rwkv_layer_ids(cfg))
    states = [
        {"shift": torch.zeros(C, dtype=torch.float64), "S": torch.zeros(H, HEAD, HEAD, dtype=torch.float64)}
        if i in wkv
        else {"k": [], "v": []}
        for i in range(L)
    ]
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    logits = []
    for pos, tok in enumerate(ids):
        h = sd["model.embed_tokens.weight"][tok].clone()
        for i in range(L):
            pre = f"model.layers.{i}."
            x = _rms(h, sd[pre + "input_layernorm.weight"], eps)
            sub = pre + ("self_attn.time_mixer." if i in wkv else "self_attn.")
            p = {k[len(sub) :]: v for k, v in sd.items() if k.startswith(sub)}
            h = h + (_time_mix6(p, x, states[i], cfg) if i in wkv else _attention(p, x, states[i], cfg, pos))
            x = _rms(h, sd[pre + "post_attention_layernorm.weight"], eps)
            gate = sd[pre + "mlp.gate_proj.weight"] @ x
            up = sd[pre + "mlp.up_proj.weight"] @ x
            h = h + sd[pre + "mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up)
        logits.append(head @ _rms(h, sd["model.norm.weight"], eps))
    return torch.stack(logits)
