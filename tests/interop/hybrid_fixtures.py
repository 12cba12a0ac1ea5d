"""Test-side ground truth for the published ARWKV format (`model_type: rwkv_hybrid`).

Two things live here, both written from the format description (shared/docs/interop-rwkv_hybrid.md), not from
arwkv's code, so the loader is checked against an independent reading of the equations:

* `make_hybrid` / `write_hybrid`: a tiny random checkpoint in the exact published key layout and file formats
  (safetensors or torch .bin, optionally sharded with an index json).
* `reference_logits`: a plain per-token fp64 implementation of the published forward (RWKV-7 time mixing with
  the BlinkDL state layout, Qwen2 attention for the non-RWKV layers, Qwen2 RMSNorm / SwiGLU MLP).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

Tensor = torch.Tensor

HEAD = 64  # every release uses head size 64; the published code fixes the LoRA ranks below
RANKS = {"w": 64, "a": 64, "v": 32, "g": 128}


def hybrid_config(
    *,
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 101,
    inter: int = 96,
    gate: bool = True,
    group_norm: bool = False,
    wkv_layers: list[int] | str | None = None,
    tie: bool = False,
    heads: int = 4,
    kv_heads: int = 2,
) -> dict:
    return {
        "model_type": "rwkv_hybrid",
        "architectures": ["RwkvHybridForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "head_size": HEAD,
        "head_size_divisor": 8,
        "wkv_version": 7,
        "wkv_has_gate": gate,
        "wkv_has_group_norm": group_norm,
        "wkv_use_vfirst": True,
        "wkv_layers": wkv_layers,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def rwkv_layer_ids(cfg: dict) -> list[int]:
    wl = cfg.get("wkv_layers")
    if wl is None or wl == "full":
        return list(range(cfg["num_hidden_layers"]))
    return list(wl)


def make_hybrid(cfg: dict, seed: int = 0, x_g_without_gate: bool = False) -> dict[str, Tensor]:
    """Random weights at scales that keep every branch of the forward active (decays spread over their range,
    LoRAs non-zero, residual mixes away from 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    C, V, F = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    H = C // HEAD
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = C // nh

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

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
            sd[a + "q_proj.weight"] = rnd(nh * hd, C, scale=C**-0.5)
            sd[a + "q_proj.bias"] = rnd(nh * hd, scale=0.1)
            sd[a + "k_proj.weight"] = rnd(nkv * hd, C, scale=C**-0.5)
            sd[a + "k_proj.bias"] = rnd(nkv * hd, scale=0.1)
            sd[a + "v_proj.weight"] = rnd(nkv * hd, C, scale=C**-0.5)
            sd[a + "v_proj.bias"] = rnd(nkv * hd, scale=0.1)
            sd[a + "o_proj.weight"] = rnd(C, nh * hd, scale=(nh * hd) ** -0.5)
            continue
        t = p + "self_attn.time_mixer."
        for m in "rwkva":
            sd[t + f"x_{m}"] = uni(1, 1, C, lo=0.0, hi=1.0)
        if cfg["wkv_has_gate"] or x_g_without_gate:
            sd[t + "x_g"] = uni(1, 1, C, lo=0.0, hi=1.0)
        for m, r in RANKS.items():
            if m == "g" and not cfg["wkv_has_gate"]:
                continue
            sd[t + f"{m}1"] = rnd(C, r, scale=0.5 * C**-0.5)
            sd[t + f"{m}2"] = rnd(r, C, scale=0.5 * r**-0.5)
            if m in ("a", "v"):
                sd[t + f"{m}0"] = rnd(1, 1, C, scale=0.5)
        sd[t + "w0"] = uni(1, 1, C, lo=-6.0, hi=1.0)  # decays from ~1 to ~0.55
        sd[t + "k_k"] = uni(1, 1, C, lo=0.5, hi=1.0)
        sd[t + "k_a"] = uni(1, 1, C, lo=0.5, hi=1.5)
        sd[t + "r_k"] = rnd(H, HEAD, scale=0.3)
        for name in ("receptance", "key", "value", "output"):
            sd[t + f"{name}.weight"] = rnd(C, C, scale=C**-0.5)
        if cfg["wkv_has_group_norm"]:
            sd[t + "ln_x.weight"] = uni(C, lo=0.5, hi=1.5)
            sd[t + "ln_x.bias"] = rnd(C, scale=0.1)
    return sd


def write_hybrid(
    out: Path, cfg: dict, sd: dict[str, Tensor], fmt: str = "safetensors", shards: int = 1
) -> Path:
    """Write `config.json` and the weights the way `save_pretrained` lays them out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    keys = sorted(sd)
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")

    def save(part: dict[str, Tensor], name: str) -> None:
        part = {k: v.contiguous() for k, v in part.items()}
        if fmt == "safetensors":
            save_file(part, str(out / name), metadata={"format": "pt"})
        else:
            torch.save(part, out / name)

    if shards == 1:
        save(sd, f"{stem}.{ext}")
        return out
    weight_map = {}
    for s in range(shards):
        name = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in keys[s::shards]}
        save(part, name)
        weight_map.update(dict.fromkeys(part, name))
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
        "weight_map": weight_map,
    }
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return out


# ----------------------------------------------------------------------------------------------------
# the published forward, one token at a time, fp64


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * w


def _rope(x: Tensor, pos: int, theta: float) -> Tensor:
    """Qwen2 / HF half-split rotary embedding of one head vector."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x)
    for i in range(half):
        ang = pos * theta ** (-2.0 * i / d)
        c, s = math.cos(ang), math.sin(ang)
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def _time_mix(p: dict[str, Tensor], x: Tensor, st: dict, cfg: dict, layer: int, vf: dict) -> Tensor:
    C = x.shape[0]
    H, N = C // HEAD, HEAD
    xx = st["shift"] - x
    st["shift"] = x.clone()
    mix = {m: x + xx * p[f"x_{m}"].reshape(C) for m in ("r", "w", "k", "v", "a", "g") if f"x_{m}" in p}
    r = p["receptance.weight"] @ mix["r"]
    k = p["key.weight"] @ mix["k"]
    v = p["value.weight"] @ mix["v"]
    d = p["w0"].reshape(C) + torch.tanh(mix["w"] @ p["w1"]) @ p["w2"]
    decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(d))  # = exp(-exp(-softplus(-d) - 0.5))
    if layer == 0:
        vf["v"] = v.clone()
    else:
        m = torch.sigmoid(p["v0"].reshape(C) + (mix["v"] @ p["v1"]) @ p["v2"])
        v = v + (vf["v"] - v) * m
    a = torch.sigmoid(p["a0"].reshape(C) + (mix["a"] @ p["a1"]) @ p["a2"])
    kk = k * p["k_k"].reshape(C)
    k = k * (1 + (a - 1) * p["k_a"].reshape(C))
    y = torch.zeros(C, dtype=x.dtype)
    S = st["S"]
    for h in range(H):
        sl = slice(h * N, (h + 1) * N)
        kh = kk[sl] / max(float(kk[sl].norm()), 1e-12)
        aa, bb = -kh, kh * a[sl]
        # rows = value index i, columns = key index j
        for i in range(N):
            sa = float(S[h, i] @ aa)  # the state before this token's decay
            S[h, i] = S[h, i] * decay[sl] + sa * bb + v[sl][i] * k[sl]
        y[sl] = S[h] @ r[sl]
    if "ln_x.weight" in p:
        eps = 1e-5 * cfg["head_size_divisor"] ** 2
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            mu = y[sl].mean()
            var = ((y[sl] - mu) ** 2).mean()
            y[sl] = (y[sl] - mu) / torch.sqrt(var + eps) * p["ln_x.weight"][sl] + p["ln_x.bias"][sl]
    for h in range(H):
        sl = slice(h * N, (h + 1) * N)
        y[sl] = y[sl] + (r[sl] * k[sl] * p["r_k"][h]).sum() * v[sl]
    if cfg["wkv_has_gate"]:
        g = torch.sigmoid(mix["g"] @ p["g1"]) @ p["g2"]
        y = y * g
    return p["output.weight"] @ y


def _attention(p: dict[str, Tensor], x: Tensor, st: dict, cfg: dict, pos: int) -> Tensor:
    C = x.shape[0]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = C // nh
    q = (p["q_proj.weight"] @ x + p["q_proj.bias"]).reshape(nh, hd)
    k = (p["k_proj.weight"] @ x + p["k_proj.bias"]).reshape(nkv, hd)
    v = (p["v_proj.weight"] @ x + p["v_proj.bias"]).reshape(nkv, hd)
    q, k = _rope(q, pos, cfg["rope_theta"]), _rope(k, pos, cfg["rope_theta"])
    st["k"].append(k)
    st["v"].append(v)
    out = torch.zeros(nh, hd, dtype=x.dtype)
    for h in range(nh):
        g = h // (nh // nkv)
        scores = torch.tensor([float(q[h] @ kt[g]) / math.sqrt(hd) for kt in st["k"]], dtype=x.dtype)
        att = torch.softmax(scores, dim=0)
        out[h] = sum(att[t] * st["v"][t][g] for t in range(len(st["v"])))
    return p["o_proj.weight"] @ out.reshape(C)


def reference_logits(cfg: dict, sd: dict[str, Tensor], ids: list[int]) -> Tensor:
    """Logits [T, vocab] of the published model for one sequence, computed token by token in fp64."""
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
        vf: dict[str, Tensor] = {}
        for i in range(L):
            pre = f"model.layers.{i}."
            x = _rms(h, sd[pre + "input_layernorm.weight"], eps)
            if i in wkv:
                sub = pre + "self_attn.time_mixer."
                p = {k[len(sub) :]: v for k, v in sd.items() if k.startswith(sub)}
                h = h + _time_mix(p, x, states[i], cfg, i, vf)
            else:
                sub = pre + "self_attn."
                p = {k[len(sub) :]: v for k, v in sd.items() if k.startswith(sub)}
                h = h + _attention(p, x, states[i], cfg, pos)
            x = _rms(h, sd[pre + "post_attention_layernorm.weight"], eps)
            gate = sd[pre + "mlp.gate_proj.weight"] @ x
            up = sd[pre + "mlp.up_proj.weight"] @ x
            h = h + sd[pre + "mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up)
        logits.append(head @ _rms(h, sd["model.norm.weight"], eps))
    return torch.stack(logits)
