"""Load a llama2.c checkpoint (legacy "v0" format, e.g. stories260K.bin) as a transformers `LlamaForCausalLM`.

File layout (llama2.c `export.py` legacy format): 7 little-endian int32 `dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size, seq_len` (a negative vocab_size means the classifier is not tied to the
embedding), then float32 tensors in this order: tok_embeddings, attention_norm, wq, wk, wv, wo, ffn_norm,
w1, w2, w3, final norm, freq_cis_real, freq_cis_imag and, when untied, wcls. Per-layer tensors are stored
layer by layer.

llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; transformers' Llama rotates the two
halves (x_i, x_{i+hd/2}). Permuting the rows of wq and wk once makes both compute the same attention scores.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from arwkv.errors import CheckpointError

HEADER_BYTES = 7 * 4
# Newer llama2.c export formats start with this magic number instead of the legacy header.
LLAMA2C_MAGIC = 0x616B3432


def read_llama2c_header(path: str | Path) -> dict[str, int | bool]:
    """The checkpoint's hyper-parameters, checked for plausibility (the file is not read further)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"llama2.c checkpoint {path} does not exist (expected a file such as stories260K.bin)"
        )
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise CheckpointError(f"{path} is {len(raw)} bytes, too short for a llama2.c header (28 bytes)")
    if struct.unpack("<I", raw[:4])[0] == LLAMA2C_MAGIC:
        raise CheckpointError(
            f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy v0 format is supported: "
            "re-export it with llama2.c's `export.py --version 0`"
        )
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw)
    hp = dict(
        dim=dim,
        hidden_dim=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab),
        seq_len=seq_len,
        shared_classifier=vocab > 0,
    )
    ok = min(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) > 0
    if not ok or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise CheckpointError(f"{path} does not look like a llama2.c checkpoint: implausible header {hp}")
    return hp


def _tensor_shapes(hp: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored array, in file order."""
    d, h, L, V = hp["dim"], hp["hidden_dim"], hp["n_layers"], hp["vocab_size"]
    hd = d // hp["n_heads"]
    kv = hp["n_kv_heads"] * hd
    shapes = [
        ("tok_embeddings", (V, d)),
        ("attention_norm", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, d)),
        ("ffn_norm", (L, d)),
        ("w1", (L, h, d)),
        ("w2", (L, d, h)),
        ("w3", (L, h, d)),
        ("norm", (d,)),
        ("freq_cis_real", (hp["seq_len"], hd // 2)),
        ("freq_cis_imag", (hp["seq_len"], hd // 2)),
    ]
    if not hp["shared_classifier"]:
        shapes.append(("wcls", (V, d)))
    return shapes


def read_llama2c(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and raw llama2.c tensors (llama2.c row order, nothing permuted)."""
    path = Path(path)
    hp = read_llama2c_header(path)
    shapes = _tensor_shapes(hp)
    n_floats = sum(math.prod(s) for _, s in shapes)
    expected = HEADER_BYTES + 4 * n_floats
    size = path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CheckpointError(
            f"{path} is {what}: {size} bytes, but its header {hp} implies {expected} bytes "
            "(legacy v0 layout with the two RoPE tables); re-download or re-export the checkpoint"
        )
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER_BYTES).astype(np.float32))
    tensors, pos = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        tensors[name] = flat[pos : pos + n].view(shape)
        pos += n
    return hp, tensors


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows so HF's rotate-half RoPE equals llama2.c's interleaved-pair RoPE.

    Within each head, output row 2i (pair i, real part) moves to i and row 2i+1 (imaginary part) to i + hd/2.
    """
    out_features, in_features = w.shape
    hd = out_features // n_heads
    return w.view(n_heads, hd // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def rope_theta_from_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> float:
    """The RoPE base that produced llama2.c's stored cos/sin tables (freq_i = theta^(-2i/hd)).

    Raises when the tables are not plain RoPE (e.g. scaled frequencies), which a Llama config can't express.
    """
    n_pairs = head_dim // 2
    if n_pairs < 2 or cos.shape[0] < 2:
        return 10000.0  # the frequencies carry no information about theta; llama2.c's default
    freqs = torch.atan2(sin[1].double(), cos[1].double())  # angle at position 1 = freq_i (all < pi)
    i = torch.arange(1, n_pairs, dtype=torch.float64)
    # log freq_i = -(2i/hd) log theta; least squares through the origin over i >= 1
    slope = (i * freqs[1:].log()).sum() / (i * i).sum()
    theta = float(torch.exp(-slope * head_dim / 2))
    pos = torch.arange(cos.shape[0], dtype=torch.float64)[:, None]
    angles = pos * theta ** (-2 * torch.arange(n_pairs, dtype=torch.float64) / head_dim)
    err = max(
        (angles.cos() - cos.double()).abs().max().item(), (angles.sin() - sin.double()).abs().max().item()
    )
    if err > 1e-3:
        raise CheckpointError(
            f"the checkpoint's RoPE tables are not standard RoPE (best fit theta={theta:.1f} is off by "
            f"{err:.2g}); "
            "scaled or custom RoPE in llama2.c checkpoints is not supported"
        )
    # the tables are fp32: snap to the integer base they were almost surely made from (10000, 500000, ...)
    return float(round(theta)) if abs(theta - round(theta)) < 1e-4 * theta else theta


def load_llama2c(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A llama2.c checkpoint as an HF `LlamaForCausalLM` in eval mode (BOS = 1, EOS = 2 as in llama2.c).

    >>> teacher = load_llama2c("../shared/assets/llama2c-stories260K/stories260K.bin")
    >>> teacher(torch.tensor([[1]])).logits.shape
    torch.Size([1, 1, 512])
    """
    path = Path(path)
    hp, t = read_llama2c(path)
    d, L, nh, nkv = hp["dim"], hp["n_layers"], hp["n_heads"], hp["n_kv_heads"]
    theta = rope_theta_from_tables(t["freq_cis_real"], t["freq_cis_imag"], d // nh)
    config = LlamaConfig(
        vocab_size=hp["vocab_size"],
        hidden_size=d,
        intermediate_size=hp["hidden_dim"],
        num_hidden_layers=L,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        max_position_embeddings=hp["seq_len"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=hp["shared_classifier"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    state = {
        "model.embed_tokens.weight": t["tok_embeddings"],
        "model.norm.weight": t["norm"],
        "lm_head.weight": t["tok_embeddings"] if hp["shared_classifier"] else t["wcls"],
    }
    for i in range(L):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": t["attention_norm"][i],
            p + "self_attn.q_proj.weight": interleaved_to_half_split(t["wq"][i], nh),
            p + "self_attn.k_proj.weight": interleaved_to_half_split(t["wk"][i], nkv),
            p + "self_attn.v_proj.weight": t["wv"][i],
            p + "self_attn.o_proj.weight": t["wo"][i],
            p + "post_attention_layernorm.weight": t["ffn_norm"][i],
            p + "mlp.gate_proj.weight": t["w1"][i],
            p + "mlp.down_proj.weight": t["w2"][i],
            p + "mlp.up_proj.weight": t["w3"][i],
        }
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # assign=True adopts our tensors instead of copying into meta storage; strict catches any naming drift.
    model.load_state_dict({k: v.contiguous().clone() for k, v in state.items()}, strict=True, assign=True)
    if hp["shared_classifier"]:
        model.tie_weights()
    # the rotary module's buffers were created on the meta device: rebuild it for real
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.name_or_path = str(path)
    return model.to(dtype).eval()
