"""llama.cpp interop for RWKV-6 students of the QRWKV6 form (`rwkv6_variant: qrwkv`): the export is an
`RWKV6Qwen2ForCausalLM` folder, which llama.cpp's converter turns into an `rwkv6qwen2` GGUF.

Without llama.cpp: the exported folder, run by an independent per-token implementation of the RWKV6Qwen2
format written here, gives the student's logits. With a llama.cpp source tree in `ARWKV_LLAMACPP_DIR`: the
converter's GGUF holds every tensor of the export, and a per-token implementation of llama.cpp's rwkv6qwen2
graph (src/models/rwkv6-base.cpp: GLA with scale N^-1/2, k·(1-w), sigmoid gate, no GroupNorm), run on the
GGUF's tensors, gives the student's logits too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from arwkv.errors import CheckpointError
from arwkv.interop.llamacpp import (
    check_gguf,
    convert_to_gguf,
    export_for_llamacpp,
    llamacpp_problems,
)
from arwkv.interop.rwkv_hybrid import read_state_dict
from arwkv.models.arwkv import ArwkvConfig, ArwkvForCausalLM

LLAMACPP = Path(os.environ.get("ARWKV_LLAMACPP_DIR", ""))
QWEN_VOCAB = 151936
needs_llamacpp = pytest.mark.skipif(
    not (LLAMACPP / "convert_hf_to_gguf.py").is_file(),
    reason="set ARWKV_LLAMACPP_DIR to a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/)",
)


def _student(seed: int = 0, vocab: int = 100, **options) -> ArwkvForCausalLM:
    from transformers import Qwen2Config

    teacher = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=True,
        bos_token_id=min(151643, vocab - 1),
        eos_token_id=min(151645, vocab - 1),
    ).to_dict()
    opts = dict(version=6, rwkv6_variant="qrwkv", head_size=16, rkv_bias=True) | options
    cfg = ArwkvConfig(teacher_config=teacher, **opts)
    torch.manual_seed(seed)
    model = ArwkvForCausalLM(cfg)
    with torch.no_grad():  # every tensor away from its init, so that every term moves the logits
        for name, p in model.named_parameters():
            p.add_((0.3 if ".self_attn." in name else 0.05) * torch.randn_like(p))
    return model.eval()


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _mlp(x, gate, up, down):
    return down @ (torch.nn.functional.silu(gate @ x) * (up @ x))


def rwkv6qwen2_folder_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """An RWKV6Qwen2ForCausalLM folder run token by token (fp64), from the format: Qwen2 decoder layers whose
    attention is RWKV-6 time mixing with token-shift LoRA blocks r, k, v, w, g, decay exp(-exp(.)),
    k·(1 - decay), state read after the write with scale N^-1/2, sigmoid gate."""
    cfg = json.loads((folder / "config.json").read_text())
    sd = {k: v.double() for k, v in read_state_dict(folder).items()}
    C, H, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    N = C // H
    lin = lambda name, x: sd[name + ".weight"] @ x + sd.get(name + ".bias", 0)
    prev = [torch.zeros(C, dtype=torch.float64) for _ in range(cfg["num_hidden_layers"])]
    state = [torch.zeros(H, N, N, dtype=torch.float64) for _ in range(cfg["num_hidden_layers"])]
    out = []
    for tok in ids:
        h = sd["model.embed_tokens.weight"][tok]
        for i in range(cfg["num_hidden_layers"]):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            x = _rms(h, sd[p + "input_layernorm.weight"], eps)
            sx, prev[i] = prev[i] - x, x
            lora = torch.tanh((x + sx * sd[a + "time_maa_x"].flatten()) @ sd[a + "time_maa_w1"]).view(5, -1)
            mix = {
                m: x + sx * (sd[a + f"time_maa_{m}"].flatten() + lora[j] @ sd[a + "time_maa_w2"][j])
                for j, m in enumerate("rkvwg")
            }
            w = (
                sd[a + "time_decay"].flatten()
                + torch.tanh(mix["w"] @ sd[a + "time_decay_w1"]) @ sd[a + "time_decay_w2"]
            )
            decay = torch.exp(-torch.exp(w)).view(H, N)
            r = lin(a + "q_proj", mix["r"]).view(H, N)
            k = lin(a + "k_proj", mix["k"]).view(H, N) * (1 - decay)
            v = lin(a + "v_proj", mix["v"]).view(H, N)
            state[i] = decay[..., None] * state[i] + k[..., None] * v[:, None, :]
            y = torch.einsum("hk,hkv->hv", r, state[i]).flatten() * N**-0.5
            y = y * torch.sigmoid(sd[a + "gate.weight"] @ mix["g"])
            h = h + sd[a + "o_proj.weight"] @ y
            n = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
            h = h + _mlp(n, *(sd[p + f"mlp.{m}_proj.weight"] for m in ("gate", "up", "down")))
        out.append(sd["lm_head.weight"] @ _rms(h, sd["model.norm.weight"], eps))
    return torch.stack(out)


def rwkv6qwen2_gguf_logits(report, ids: list[int]) -> torch.Tensor:
    """llama.cpp's rwkv6qwen2 graph token by token (fp64) on a GGUF's tensors (numpy shapes = GGUF ne
    reversed): mixes fused as w, k, v, r, g; W1 [5R, C], W2 [5, C, R]; decay LoRA [R, C] then [C, R]."""
    arrays = {
        t.name: np.asarray(t.data, dtype=np.float64).reshape(report.tensors[t.name])
        for t in report.reader.tensors
    }
    T = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    meta = report.metadata
    C, L, N = (
        meta["rwkv6qwen2.embedding_length"],
        meta["rwkv6qwen2.block_count"],
        meta["rwkv6qwen2.wkv.head_size"],
    )
    eps, H = meta["rwkv6qwen2.attention.layer_norm_rms_epsilon"], C // N
    lin = lambda name, x: T[name + ".weight"] @ x + T.get(name + ".bias", 0)
    prev = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    state = [torch.zeros(H, N, N, dtype=torch.float64) for _ in range(L)]
    out = []
    for tok in ids:
        h = T["token_embd.weight"][tok]
        for i in range(L):
            b = f"blk.{i}."
            x = _rms(h, T[b + "attn_norm.weight"], eps)
            sx, prev[i] = prev[i] - x, x
            lora = torch.tanh(T[b + "time_mix_w1.weight"] @ (x + sx * T[b + "time_mix_lerp_x.weight"]))
            lora = lora.view(5, -1)
            fused = T[b + "time_mix_lerp_fused.weight"].view(5, C)
            xw, xk, xv, xr, xg = (
                x + sx * (fused[j] + T[b + "time_mix_w2.weight"][j] @ lora[j]) for j in range(5)
            )
            w = T[b + "time_mix_decay.weight"] + T[b + "time_mix_decay_w2.weight"] @ torch.tanh(
                T[b + "time_mix_decay_w1.weight"] @ xw
            )
            decay = torch.exp(-torch.exp(w)).view(H, N)
            r = lin(b + "time_mix_receptance", xr).view(H, N)
            k = lin(b + "time_mix_key", xk).view(H, N)
            k = k - k * decay
            v = lin(b + "time_mix_value", xv).view(H, N)
            state[i] = decay[..., None] * state[i] + k[..., None] * v[:, None, :]
            y = torch.einsum("hk,hkv->hv", r, state[i]).flatten() * N**-0.5
            y = y * torch.sigmoid(T[b + "time_mix_gate.weight"] @ xg)
            h = h + T[b + "time_mix_output.weight"] @ y
            n = _rms(h, T[b + "ffn_norm.weight"], eps)
            h = h + _mlp(n, *(T[b + f"ffn_{m}.weight"] for m in ("gate", "up", "down")))
        out.append(T["output.weight"] @ _rms(h, T["output_norm.weight"], eps))
    return torch.stack(out)


IDS = [5, 17, 3, 99, 42, 42, 8, 61, 0, 23]


@pytest.mark.parametrize("options", [{}, dict(use_token_shift=False), dict(rkv_bias=False, head_size=32)])
def test_rwkv6qwen2_export_runs_like_the_student(tmp_path: Path, options: dict) -> None:
    student = _student(**options).double()
    export = export_for_llamacpp(student, tmp_path / "export", tokenizer=None, dtype=torch.float64)
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architectures"] == ["RWKV6Qwen2ForCausalLM"] and cfg["num_attention_heads"] == 64 // (
        options.get("head_size", 16)
    )
    with torch.no_grad():
        want = student(torch.tensor([IDS])).logits[0]
    got = rwkv6qwen2_folder_logits(export, IDS)
    # (transformers' RMSNorm computes in fp32 even for fp64 inputs: ~1e-6 of the difference is that)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # not vacuous: the same reference on another student's export disagrees
    other = export_for_llamacpp(_student(seed=1, **options).double(), tmp_path / "other", None, torch.float64)
    assert (rwkv6qwen2_folder_logits(other, IDS) - want).abs().max() > 1e-2


@pytest.mark.parametrize(
    "options,hint",
    [
        (dict(rwkv6_variant="finch"), "rwkv6_variant=qrwkv"),
        (dict(softmax_layers=[1]), "softmax_layers=[]"),
        (dict(use_rope=True), "use_rope=false"),
        (dict(use_gate=False), "use_gate=true"),
        (dict(mixer_expand=2), "mixer_expand=1"),
    ],
)
def test_rwkv6qwen2_export_refuses_what_llamacpp_cannot_run(tmp_path: Path, options: dict, hint: str) -> None:
    student = _student(**options)
    assert llamacpp_problems(student)
    with pytest.raises(CheckpointError, match="cannot be exported for llama.cpp's rwkv6qwen2") as e:
        export_for_llamacpp(student, tmp_path, None)
    assert "\n" not in str(e.value) and hint.split("=")[0] in str(e.value)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    shared = Path(os.environ.get("ARWKV_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
    tokenizer = shared / "assets" / "qwen2-tokenizer"
    if not tokenizer.is_dir():
        pytest.skip(f"the Qwen2 tokenizer is not at {tokenizer} (set ARWKV_SHARED)")
    tmp = tmp_path_factory.mktemp("rwkv6qwen2")
    student = _student(vocab=QWEN_VOCAB)
    export = export_for_llamacpp(student, tmp / "export", tokenizer)
    gguf = convert_to_gguf(export, tmp / "model.gguf", LLAMACPP, outtype="f32")
    return student, export, check_gguf(gguf, source=export)


@needs_llamacpp
@pytest.mark.slow
def test_llamacpp_converts_the_rwkv6_export(converted, tmp_path: Path) -> None:
    student, export, report = converted
    assert report.metadata["general.architecture"] == "rwkv6qwen2"
    assert len(report.tensors) == 3 + 2 * 20 and sorted(report.compared) == sorted(report.tensors)
    assert report.metadata["rwkv6qwen2.wkv.head_size"] == 16
    other = export_for_llamacpp(_student(seed=1, vocab=QWEN_VOCAB), tmp_path / "other", export)
    with pytest.raises(CheckpointError, match="differs from the source"):
        check_gguf(report.reader, source=other)


@needs_llamacpp
@pytest.mark.slow
def test_the_rwkv6qwen2_graph_on_the_gguf_gives_the_student_logits(converted) -> None:
    student, _, report = converted
    ids = [9707, 1879, 0, 151644, 872, 198, 3838, 374, 220, 17]
    with torch.no_grad():
        want = student.double()(torch.tensor([ids])).logits[0]
    student.float()
    torch.testing.assert_close(rwkv6qwen2_gguf_logits(report, ids), want, rtol=0, atol=1e-4)


def test_rwkv_hybrid_refuses_the_qrwkv_form(tmp_path: Path) -> None:
    from arwkv.interop.rwkv_hybrid import export_rwkv_hybrid

    with pytest.raises(CheckpointError, match="qrwkv form") as e:
        export_rwkv_hybrid(_student(head_size=64, rkv_bias=False), tmp_path)
    assert "rwkv6_variant=finch" in str(e.value) and "\n" not in str(e.value)
