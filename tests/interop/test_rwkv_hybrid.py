"""The published ARWKV format (`rwkv_hybrid`): arwkv's forward on such checkpoints equals an independent
per-token implementation of the published equations; export -> load round trips; bad files are named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hybrid6_fixtures import hybrid_config6, make_hybrid6, reference_logits6  # noqa: E402
from hybrid_fixtures import (  # noqa: E402
    RANKS,
    hybrid_config,
    make_hybrid,
    reference_logits,
    write_hybrid,
)

from arwkv.errors import CheckpointError  # noqa: E402
from arwkv.interop.rwkv_hybrid import (  # noqa: E402
    export_problems,
    export_rwkv_hybrid,
    load_rwkv_hybrid,
    read_state_dict,
    student_ranks,
)
from arwkv.loading import load_model  # noqa: E402
from arwkv.models.arwkv import ArwkvConfig, ArwkvForCausalLM  # noqa: E402

IDS = [3, 17, 5, 99, 42, 7, 0, 64]
# fp64 model vs fp64 reference; the student keeps its decay and transformers its RMSNorm in fp32 (~1e-7
# relative). A wrong GroupNorm eps (1e-5 for 64e-5) moves these logits by ~1e-2, r_k * 1.001 by ~2e-3.
ATOL, RTOL = 1e-5, 1e-6

ST, BIN = "safetensors", "bin"
# name: (config options, file layout, make_hybrid options)
CASES = {
    "gated": (dict(gate=True), dict(fmt=ST, shards=1), {}),
    "gate-free+groupnorm": (dict(gate=False, group_norm=True), dict(fmt=BIN, shards=3), {}),
    "gate-free+stored-x_g": (dict(gate=False), dict(fmt=ST, shards=2), dict(x_g_without_gate=True)),
    "hybrid-wkv_layers": (dict(layers=3, wkv_layers=[0, 2], gate=True), dict(fmt=ST, shards=1), {}),
    "tied+groupnorm": (dict(tie=True, group_norm=True, wkv_layers="full"), dict(fmt=BIN, shards=1), {}),
}


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_published_equations(tmp_path: Path, case: str) -> None:
    cfg_kw, file_kw, make_kw = CASES[case]
    cfg = hybrid_config(**cfg_kw)
    sd = make_hybrid(cfg, **make_kw)
    write_hybrid(tmp_path, cfg, sd, **file_kw)
    model = load_rwkv_hybrid(tmp_path, dtype=torch.float64, wkv_backend="chunked")
    ref = reference_logits(cfg, sd, IDS)
    got = _logits(model, IDS)
    assert ref.abs().max() > 1.0  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_every_weight_is_read(tmp_path: Path) -> None:
    """Perturbing any one published tensor changes the logits: nothing is silently dropped or zero-filled."""
    cfg = hybrid_config(layers=3, wkv_layers=[0, 2], gate=True, group_norm=True)
    sd = make_hybrid(cfg)
    write_hybrid(tmp_path / "base", cfg, sd)
    base = _logits(load_rwkv_hybrid(tmp_path / "base", dtype=torch.float64), IDS)
    # layer 0's v0/v1/v2 are the published unused tensors; the others must all matter
    probe = [k for k in sd if not (k.startswith("model.layers.0.self_attn.time_mixer.v"))]
    for i, key in enumerate(probe[::3]):
        bent = dict(sd)
        bent[key] = sd[key] + 0.05 * torch.randn_like(sd[key])
        write_hybrid(tmp_path / str(i), cfg, bent)
        moved = _logits(load_rwkv_hybrid(tmp_path / str(i), dtype=torch.float64), IDS)
        assert (moved - base).abs().max() > 1e-6, key


@pytest.mark.parametrize("case", ["gated", "hybrid-wkv_layers"])
def test_decoding_is_recurrent_and_matches_full_forward(tmp_path: Path, case: str) -> None:
    cfg = hybrid_config(**CASES[case][0])
    sd = make_hybrid(cfg)
    write_hybrid(tmp_path, cfg, sd)
    model = load_model(tmp_path, dtype=torch.float64)[0]
    full = _logits(model, IDS)
    out = model(torch.tensor([IDS[:3]]), use_cache=True)
    cache, steps = out.cache, [out.logits[0]]
    rwkv = [cache.layers[i] for i in model.config.rwkv_layers]
    sizes = None
    for tok in IDS[3:]:
        out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
        steps.append(out.logits[0])
        now = [tuple(t.shape) for layer in rwkv for t in layer.get_state() if t is not None]
        assert sizes in (None, now)  # RWKV layers carry a constant-size state, whatever the length
        sizes = now
    torch.testing.assert_close(torch.cat(steps), full, atol=ATOL, rtol=RTOL)
    gen = model.generate(torch.tensor([IDS[:4]]), max_new_tokens=4, do_sample=False)
    seq = IDS[:4]
    for _ in range(4):  # greedy decoding == argmax of repeated full forwards
        seq.append(int(_logits(model, seq)[-1].argmax()))
    assert gen[0].tolist() == seq


@pytest.mark.parametrize("case", ["gated", "gate-free+groupnorm", "hybrid-wkv_layers", "tied+groupnorm"])
def test_export_load_round_trip(tmp_path: Path, case: str) -> None:
    cfg_kw, _, _ = CASES[case]
    cfg = hybrid_config(**cfg_kw)
    sd = make_hybrid(cfg)
    write_hybrid(tmp_path / "a", cfg, sd)
    model = load_rwkv_hybrid(tmp_path / "a", dtype=torch.float32)
    export_rwkv_hybrid(model, tmp_path / "b")
    again = load_rwkv_hybrid(tmp_path / "b")
    assert torch.equal(_logits(model, IDS), _logits(again, IDS))
    exported = read_state_dict(tmp_path / "b")
    assert set(exported) == set(sd)  # the published layout, key for key
    for k, v in sd.items():
        assert torch.equal(exported[k], v), k
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    for key in (
        "model_type",
        "head_size",
        "head_size_divisor",
        "wkv_has_gate",
        "wkv_has_group_norm",
        "wkv_version",
        "tie_word_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "num_key_value_heads",
    ):
        assert written[key] == cfg[key], key
    wkv = cfg["wkv_layers"]
    assert written["wkv_layers"] == (list(range(cfg["num_hidden_layers"])) if wkv in (None, "full") else wkv)


def _qwen2_teacher(**kw) -> dict:
    from transformers import Qwen2Config

    base = dict(
        hidden_size=128,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )
    return Qwen2Config(**(base | kw)).to_dict()


def _student(teacher: dict | None = None, **opts) -> ArwkvForCausalLM:
    defaults = dict(head_size=64, lora_ranks={"w": 64, "a": 64, "v": 32, "g": 128}, use_group_norm=False)
    torch.manual_seed(0)
    model = ArwkvForCausalLM(ArwkvConfig(teacher_config=teacher or _qwen2_teacher(), **(defaults | opts)))
    with torch.no_grad():  # random everywhere: BlinkDL's init leaves many LoRAs and the output at zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(use_gate=False, use_group_norm=True),
        dict(softmax_layers=[1]),
        dict(use_token_shift=False),
    ],
    ids=["gated", "gate-free+gn", "hybrid", "no-token-shift"],
)
def test_student_export_round_trip(tmp_path: Path, opts: dict) -> None:
    student = _student(**opts)
    assert export_problems(student) == []
    export_rwkv_hybrid(student, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "rwkv_hybrid" and cfg["architectures"] == ["RwkvHybridForCausalLM"]
    loaded = load_rwkv_hybrid(tmp_path)
    assert torch.equal(_logits(student, IDS), _logits(loaded, IDS))
    # the exported file is a published-format checkpoint: the independent equations agree with it too
    sd = read_state_dict(tmp_path)
    torch.testing.assert_close(
        reference_logits(cfg, sd, IDS[:5]), _logits(student.double(), IDS[:5]), atol=ATOL, rtol=RTOL
    )


def test_llama_teacher_with_tied_embeddings_exports(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    teacher = LlamaConfig(
        hidden_size=128,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=101,
        tie_word_embeddings=True,
    ).to_dict()
    student = _student(teacher)
    export_rwkv_hybrid(student, tmp_path)
    loaded = load_rwkv_hybrid(tmp_path)
    assert "lm_head.weight" not in read_state_dict(tmp_path)
    assert torch.equal(_logits(student, IDS), _logits(loaded, IDS))


def test_export_names_everything_that_does_not_fit(tmp_path: Path) -> None:
    student = _student(
        head_size=32,
        lora_ranks={"w": 96, "a": 64, "v": 32, "g": 128},  # w above the format's 64: no padding helps
        rkv_bias=True,
        use_rope=True,
        softmax_layers=[0],
        mixer_expand=2,
    )
    problems = export_problems(student)
    text = "; ".join(problems)
    for needle in (
        "head size 32",
        "biases on receptance",
        "RoPE on r/k",
        "LoRA ranks",
        "layer 0 is softmax",
        "mixer width 256",  # mixer_expand 2
    ):
        assert needle in text, needle
    with pytest.raises(CheckpointError, match="does not fit the rwkv_hybrid format") as e:
        export_rwkv_hybrid(student, tmp_path)
    assert "head size 32" in str(e.value) and not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "gate-free"])
def test_smaller_lora_ranks_export_zero_padded(tmp_path: Path, gate: bool) -> None:
    """A rank-r LoRA is the rank-R one with zero columns/rows: the padded export's forward is the unpadded
    student's, bit for bit in fp32 (w: tanh(0) = 0; a, v: linear; g: sigmoid(0) = 1/2 meets zero rows).
    Bitwise also needs the CPU GEMM to sum x @ w1 in the same order at both widths: it does for ranks >= 16
    here (RWKV-7's size-based ranks are >= 32), not for rank 8 (logits then within ~1e-5)."""
    ranks = {"w": 32, "a": 16, "v": 16, "g": 64}
    student = _student(lora_ranks=ranks, use_gate=gate, use_group_norm=True)
    assert export_problems(student) == []
    export_rwkv_hybrid(student, tmp_path / "padded")
    sd = read_state_dict(tmp_path / "padded")
    mix = "model.layers.1.self_attn.time_mixer."
    for m, r in ranks.items():
        if m == "g" and not gate:
            assert mix + "g1" not in sd
            continue
        first, second = sd[mix + f"{m}1"], sd[mix + f"{m}2"]
        assert first.shape == (128, RANKS[m]) and second.shape == (RANKS[m], 128)
        assert not first[:, r:].any() and not second[r:].any()
        assert torch.equal(first[:, :r], getattr(student.model.layers[1].self_attn, f"{m}1"))
    loaded = load_rwkv_hybrid(tmp_path / "padded")
    assert student_ranks(loaded) == {k: v for k, v in RANKS.items() if gate or k != "g"}
    assert torch.equal(_logits(loaded, IDS), _logits(student, IDS))
    if gate:  # the zero rows of g2 carry the proof: sigmoid(0) = 1/2 times anything else moves the logits
        with torch.no_grad():
            loaded.model.layers[1].self_attn.g2[64:] = 0.1
        assert not torch.allclose(_logits(loaded, IDS), _logits(student, IDS))


def test_larger_lora_ranks_are_refused(tmp_path: Path) -> None:
    student = _student(lora_ranks={"w": 64, "a": 64, "v": 48, "g": 128})
    (problem,) = export_problems(student)
    assert "LoRA ranks" in problem and "larger are not" in problem and "lora_ranks=" in problem
    with pytest.raises(CheckpointError, match="LoRA ranks"):
        export_rwkv_hybrid(student, tmp_path)


def _write(tmp_path: Path, mutate=None, **cfg_kw) -> Path:
    cfg = hybrid_config(**cfg_kw)
    sd = make_hybrid(cfg)
    if mutate:
        mutate(cfg, sd)
    return write_hybrid(tmp_path, cfg, sd)


MIX = "model.layers.1.self_attn.time_mixer."


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c, s: s.pop(MIX + "k_a"), f"1 missing keys: {MIX}k_a"),
        (lambda c, s: s.update({MIX + "bogus": torch.zeros(3)}), f"1 unknown keys: {MIX}bogus"),
        (lambda c, s: s.update({MIX + "w1": torch.zeros(128, 32)}), rf"{MIX}w1: \(128, 32\) \(expected"),
        (lambda c, s: s.update({MIX + "ln_x.weight": torch.ones(128)}), f"unknown keys: {MIX}ln_x.weight"),
        (lambda c, s: c.update(wkv_version=5), "wkv_version 5 is not supported"),
        (lambda c, s: c.update(wkv_layers=[1]), "does not contain layer 0"),
        (lambda c, s: c.update(wkv_layers=[0, 5]), r"wkv_layers \[5\] are outside"),
        (lambda c, s: c.update(wkv_use_vfirst=False), "wkv_use_vfirst is false"),
    ],
    ids=["missing", "unknown", "shape", "groupnorm-off", "rwkv5", "no-layer0", "out-of-range", "no-vfirst"],
)
def test_bad_checkpoints_are_named(tmp_path: Path, mutate, message: str) -> None:
    path = _write(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message):
        load_rwkv_hybrid(path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_rwkv_hybrid(tmp_path)
    path = _write(tmp_path / "sharded")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors, pytorch_model.bin"):
        load_rwkv_hybrid(path)
    cfg = hybrid_config()
    write_hybrid(tmp_path / "s", cfg, make_hybrid(cfg), shards=2)
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists model-00002-of-00002.safetensors, which is missing"):
        load_rwkv_hybrid(tmp_path / "s")


def test_load_model_dispatches(tmp_path: Path) -> None:
    student = _student()
    student.save_pretrained(tmp_path / "student")
    assert torch.equal(_logits(load_model(tmp_path / "student")[0], IDS), _logits(student, IDS))
    export_rwkv_hybrid(student, tmp_path / "hybrid")
    assert isinstance(load_model(tmp_path / "hybrid")[0], ArwkvForCausalLM)


def test_export_with_tokenizer(tmp_path: Path, shared: Path) -> None:
    tok = shared / "assets" / "qwen2-tokenizer"
    student = _student(_qwen2_teacher(vocab_size=151936))
    export_rwkv_hybrid(student, tmp_path / "ok", tokenizer=tok)
    assert (tmp_path / "ok" / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
    with pytest.raises(CheckpointError, match="token id 151668, but the model's vocab_size is 101"):
        export_rwkv_hybrid(_student(), tmp_path / "small", tokenizer=tok)


@pytest.mark.gpu
def test_fla_backend_on_gpu(tmp_path: Path) -> None:
    cfg = hybrid_config(layers=3, wkv_layers=[0, 2], gate=True, group_norm=True)
    sd = make_hybrid(cfg)
    write_hybrid(tmp_path, cfg, sd)
    model = load_rwkv_hybrid(tmp_path, dtype=torch.float32, device="cuda", wkv_backend="fla")
    with torch.no_grad():
        got = model(torch.tensor([IDS], device="cuda")).logits[0].double().cpu()
    torch.testing.assert_close(got, reference_logits(cfg, sd, IDS), atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------
# wkv_version 6: RWKV-6 mixers

CASES6 = {
    "gated+groupnorm": dict(gate=True, group_norm=True),
    "gate-free": dict(gate=False),
    "hybrid-softmax-layer0": dict(layers=3, wkv_layers=[1, 2], gate=True, group_norm=True),  # no v_first
    "tied": dict(tie=True, gate=True, group_norm=True, wkv_layers="full"),
}


@pytest.mark.parametrize("case", list(CASES6))
def test_v6_hand_written_checkpoint_matches_per_token_equations(tmp_path: Path, case: str) -> None:
    cfg = hybrid_config6(**CASES6[case])
    sd = make_hybrid6(cfg)
    write_hybrid(tmp_path, cfg, sd)
    model = load_rwkv_hybrid(tmp_path, dtype=torch.float64, wkv_backend="chunked")
    assert model.config.version == 6
    ref = reference_logits6(cfg, sd, IDS)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(_logits(model, IDS), ref, atol=ATOL, rtol=RTOL)
    # decoding token by token carries the RWKV-6 state: same logits
    out = model(torch.tensor([IDS[:3]]), use_cache=True)
    steps = [out.logits[0]]
    for tok in IDS[3:]:
        out = model(torch.tensor([[tok]]), cache=out.cache, use_cache=True)
        steps.append(out.logits[0])
    torch.testing.assert_close(torch.cat(steps), ref, atol=ATOL, rtol=RTOL)


def test_v6_every_weight_is_read(tmp_path: Path) -> None:
    cfg = hybrid_config6(layers=2, gate=True, group_norm=True)
    sd = make_hybrid6(cfg)
    write_hybrid(tmp_path / "base", cfg, sd)
    base = _logits(load_rwkv_hybrid(tmp_path / "base", dtype=torch.float64), IDS)
    mixer = [k for k in sd if ".time_mixer." in k]
    for i, key in enumerate(mixer[1::2]):
        bent = dict(sd)
        bent[key] = sd[key] + 0.05 * torch.randn_like(sd[key])
        write_hybrid(tmp_path / str(i), cfg, bent)
        moved = _logits(load_rwkv_hybrid(tmp_path / str(i), dtype=torch.float64), IDS)
        assert (moved - base).abs().max() > 1e-6, key


@pytest.mark.parametrize("case", list(CASES6))
def test_v6_export_load_round_trip(tmp_path: Path, case: str) -> None:
    cfg = hybrid_config6(**CASES6[case])
    sd = make_hybrid6(cfg)
    write_hybrid(tmp_path / "a", cfg, sd)
    model = load_rwkv_hybrid(tmp_path / "a", dtype=torch.float32)
    export_rwkv_hybrid(model, tmp_path / "b")
    again = load_rwkv_hybrid(tmp_path / "b")
    assert torch.equal(_logits(model, IDS), _logits(again, IDS))
    exported = read_state_dict(tmp_path / "b")
    assert set(exported) == set(sd)
    for k, v in sd.items():
        assert torch.equal(exported[k], v), k
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    for key in ("wkv_version", "wkv_has_gate", "wkv_has_group_norm", "head_size", "head_size_divisor"):
        assert written[key] == cfg[key], key


def _student6(**opts) -> ArwkvForCausalLM:
    defaults = dict(version=6, head_size=64, use_group_norm=True)
    torch.manual_seed(0)
    model = ArwkvForCausalLM(ArwkvConfig(teacher_config=_qwen2_teacher(), **(defaults | opts)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(use_gate=False, use_group_norm=False),
        dict(softmax_layers=[0]),
        dict(use_token_shift=False),
    ],
    ids=["gated", "gate-free", "hybrid-layer0", "no-token-shift"],
)
def test_v6_student_export_round_trip(tmp_path: Path, opts: dict) -> None:
    student = _student6(**opts)
    assert export_problems(student) == []
    export_rwkv_hybrid(student, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["wkv_version"] == 6 and cfg["wkv_use_vfirst"] is False
    loaded = load_rwkv_hybrid(tmp_path)
    assert torch.equal(_logits(student, IDS), _logits(loaded, IDS))
    torch.testing.assert_close(
        reference_logits6(cfg, read_state_dict(tmp_path), IDS[:5]),
        _logits(student.double(), IDS[:5]),
        atol=ATOL,
        rtol=RTOL,
    )


def test_v6_smaller_lora_ranks_export_zero_padded(tmp_path: Path) -> None:
    student = _student6(lora_ranks={"w": 16, "mix": 16})
    assert export_problems(student) == []
    export_rwkv_hybrid(student, tmp_path)
    sd = read_state_dict(tmp_path)
    t = "model.layers.1.self_attn.time_mixer."
    assert sd[t + "time_maa_w1"].shape == (128, 5 * 32) and sd[t + "time_maa_w2"].shape == (5, 32, 128)
    assert sd[t + "time_decay_w1"].shape == (128, 64) and not sd[t + "time_decay_w2"][16:].any()
    assert not sd[t + "time_maa_w1"].view(128, 5, 32)[:, :, 16:].any()
    loaded = load_rwkv_hybrid(tmp_path)
    torch.testing.assert_close(_logits(loaded, IDS), _logits(student, IDS), atol=1e-5, rtol=1e-6)
    too_big = _student6(lora_ranks={"w": 96, "mix": 32})
    (problem,) = export_problems(too_big)
    assert "RWKV-6 LoRA ranks" in problem and "lora_ranks={w: 64, mix: 32}" in problem


def test_v6_bad_group_norm_eps_is_named(tmp_path: Path) -> None:
    cfg = hybrid_config6(group_norm=True)
    cfg["head_size_divisor"] = 4
    write_hybrid(tmp_path, cfg, make_hybrid6(cfg))
    with pytest.raises(CheckpointError, match="differs from RWKV-6's 64e-5"):
        load_rwkv_hybrid(tmp_path)


def test_finch_v6_student_is_refused_by_the_llamacpp_export() -> None:
    from arwkv.interop.llamacpp import llamacpp_problems

    problems = llamacpp_problems(_student6())
    assert any("finch form" in p and "[avoid with rwkv6_variant=qrwkv]" in p for p in problems)
