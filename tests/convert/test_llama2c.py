"""llama2.c loader: the HF model must compute what llama2.c computes (interleaved RoPE, GQA, tied/untied)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from arwkv.convert.llama2c import load_llama2c, read_llama2c_header
from arwkv.errors import CheckpointError

STORIES = "assets/llama2c-stories260K/stories260K.bin"


def reference_forward(path: Path, tokens: list[int]) -> torch.Tensor:
    """llama2.c's run.c forward written out directly from the file (no permutation, no transformers), fp64."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    w = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    hd, V = dim // n_heads, abs(vocab)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = w[pos : pos + n].reshape(shape)
        pos += n
        return torch.from_numpy(out.copy())

    emb, att_norm = take(V, dim), take(n_layers, dim)
    wq, wk = take(n_layers, dim, dim), take(n_layers, n_kv * hd, dim)
    wv, wo = take(n_layers, n_kv * hd, dim), take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    final_norm = take(dim)
    fcr, fci = take(seq_len, hd // 2), take(seq_len, hd // 2)
    wcls = emb if vocab > 0 else take(V, dim)

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    T = len(tokens)
    rot = torch.complex(fcr[:T], fci[:T])[:, None, :]  # [T, 1, hd/2]

    def rope(x):  # x [T, H, hd]; llama2.c rotates consecutive pairs (x0, x1), (x2, x3), ...
        xc = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * rot).reshape(x.shape)

    x = emb[torch.tensor(tokens)]
    causal = torch.ones(T, T).tril().bool()
    for i in range(n_layers):
        h = rms(x, att_norm[i])
        q = rope((h @ wq[i].T).view(T, n_heads, hd))
        k = rope((h @ wk[i].T).view(T, n_kv, hd)).repeat_interleave(n_heads // n_kv, dim=1)
        v = (h @ wv[i].T).view(T, n_kv, hd).repeat_interleave(n_heads // n_kv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", p, v).reshape(T, dim) @ wo[i].T
        h = rms(x, ffn_norm[i])
        x = x + (torch.nn.functional.silu(h @ w1[i].T) * (h @ w3[i].T)) @ w2[i].T
    return rms(x, final_norm) @ wcls.T


def write_llama2c(
    path: Path,
    *,
    dim=32,
    hidden=48,
    n_layers=2,
    n_heads=4,
    n_kv=2,
    vocab=40,
    seq_len=64,
    tied=True,
    theta=10000.0,
    seed=0,
) -> Path:
    """A random checkpoint in the legacy llama2.c layout, RoPE tables made from `theta`."""
    g = np.random.default_rng(seed)
    hd = dim // n_heads
    parts = [
        g.standard_normal(s) * 0.3
        for s in [
            (vocab, dim),
            (n_layers, dim),
            (n_layers, dim, dim),
            (n_layers, n_kv * hd, dim),
            (n_layers, n_kv * hd, dim),
            (n_layers, dim, dim),
            (n_layers, dim),
            (n_layers, hidden, dim),
            (n_layers, dim, hidden),
            (n_layers, hidden, dim),
            (dim,),
        ]
    ]
    parts[1] += 1.0
    parts[6] += 1.0
    parts[10] += 1.0
    freqs = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(seq_len)[:, None] * freqs[None]
    parts += [np.cos(ang), np.sin(ang)]
    if not tied:
        parts.append(g.standard_normal((vocab, dim)) * 0.3)
    header = struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv, vocab if tied else -vocab, seq_len)
    path.write_bytes(header + b"".join(p.astype("<f4").tobytes() for p in parts))
    return path


def test_stories260k_greedy_matches_llama2c(shared):
    model = load_llama2c(shared / STORIES)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 260_032
    out = model.generate(torch.tensor([[1]]), max_new_tokens=7, do_sample=False)
    # SOURCE.md: llama2.c's own run.c gives 461 461 401 401 401 461 378 from BOS
    assert out[0, 1:].tolist() == [461, 461, 401, 401, 401, 461, 378]


def test_stories260k_logits_equal_reference_forward(shared):
    path = shared / STORIES
    tokens = [1] + torch.randint(0, 512, (47,)).tolist()
    ref = reference_forward(path, tokens)
    with torch.no_grad():
        got = load_llama2c(path)(torch.tensor([tokens])).logits[0].double()
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("tied,theta,n_kv", [(True, 10000.0, 2), (False, 500.0, 4), (False, 10000.0, 1)])
def test_synthetic_checkpoints_match_reference(tmp_path, tied, theta, n_kv):
    path = write_llama2c(tmp_path / "m.bin", tied=tied, theta=theta, n_kv=n_kv)
    model = load_llama2c(path)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(theta, rel=1e-4)
    assert model.config.tie_word_embeddings == tied
    tokens = torch.randint(0, 40, (30,)).tolist()
    ref = reference_forward(path, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double()
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()


def test_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="nope.bin does not exist"):
        load_llama2c(tmp_path / "nope.bin")


def test_truncated_file(tmp_path, shared):
    data = (shared / STORIES).read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama2c(tmp_path / "cut.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="too short"):
        read_llama2c_header(tmp_path / "tiny.bin")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "text.bin").write_bytes(b"hello world, this is not a model at all" * 3)
    with pytest.raises(CheckpointError, match="does not look like a llama2.c checkpoint"):
        load_llama2c(tmp_path / "text.bin")
    (tmp_path / "v1.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(300))
    with pytest.raises(CheckpointError, match="legacy v0"):
        load_llama2c(tmp_path / "v1.bin")


def test_nonstandard_rope_tables_rejected(tmp_path):
    path = write_llama2c(tmp_path / "m.bin")
    raw = bytearray(path.read_bytes())
    # corrupt the sin table's last entries: no single theta explains the tables any more
    raw[-64:] = np.full(16, 0.5, dtype="<f4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="not standard RoPE"):
        load_llama2c(path)
