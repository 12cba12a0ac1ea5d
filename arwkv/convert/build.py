"""Build an RWKV-7 (or RWKV-6) student from a Hugging Face teacher: every tensor outside the replaced
attention is copied bit-exactly; the new mixers start from the teacher's q/k/v/o ("copy", RADLADS) or from
scratch ("fresh", ARWKV).

Copy init choices (calibration-stories260k.md pitfalls 1-2):
- q -> receptance, k -> key, v -> value (each KV head repeated for its query heads under GQA), o -> output,
  biases kept (Qwen2 q/k/v, Llama attention_bias) unless the mixer is built without them (`rkv_bias` /
  `output_bias` false, the bias-free layout of ARWKV and llama.cpp: the biases are dropped); with
  `mixer_expand` = e the teacher's heads are repeated e times and o is divided by e, so the copies sum to one
  teacher output (their decays differ, which breaks the symmetry);
- Qwen3's q_norm / k_norm are carried over as the mixer's `r_norm` / `k_norm` (per teacher head, before the
  optional RoPE), not folded: a normalization cannot be folded into a linear map;
- token-shift mixes mu = 0 (the copied projections see the current token, as in the teacher);
- value-residual gate bias v0 = -3 (sigmoid ≈ 0.05: later layers keep their own values);
- output gate g ≡ 1 (g1 = 0, g2 rows summing to 2 with zero-mean noise to break the rank symmetry);
- GroupNorm `ln_x` on: without it the linear-attention output is hundreds of times the teacher's;
- decay, in-context rate, k_k, k_a, r_k, ln_x weights: BlinkDL's RWKV-7 init.

RWKV-6 students (`version=6`) take the same q/k/v/o copies (GQA, biases, q/k norms, mixer_expand) and the
token shift as a no-op (all `time_maa_*` mixes 0, the ddlerp LoRA's second factor 0); their decay, bonus
and GroupNorm keep BlinkDL's RWKV-6 init, and so does the SiLU gate (orthogonal, gain 0.1): a zero gate
would silence the mixer, and SiLU has no input that makes it ≡ 1. GroupNorm stays on for both inits (the
published RWKV-6 design).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from arwkv.convert.families import check_teacher
from arwkv.models.arwkv import ArwkvConfig, ArwkvForCausalLM, ArwkvTimeMix

COPY_V0 = -3.0


def _mixer_defaults(teacher: PreTrainedModel, init: str) -> dict[str, Any]:
    """Options the chosen init implies for this teacher; explicit options override them."""
    attn = teacher.model.layers[0].self_attn
    if init == "fresh":  # ARWKV: nothing from the teacher's attention, no GroupNorm, no biases
        return {"use_group_norm": False}
    return {
        "use_group_norm": True,
        "rkv_bias": attn.q_proj.bias is not None,
        "output_bias": attn.o_proj.bias is not None,
        "use_qk_norm": getattr(attn, "q_norm", None) is not None,
    }


def _repeat_kv_rows(t: torch.Tensor, num_kv_heads: int, groups: int) -> torch.Tensor:
    """[kv_heads * hd, ...] -> [kv_heads * groups * hd, ...]: query head h reads KV head h // groups."""
    shaped = t.reshape(num_kv_heads, -1, *t.shape[1:])
    return shaped.repeat_interleave(groups, dim=0).reshape(-1, *t.shape[1:])


@torch.no_grad()
def copy_attention_into_mixer(attn: torch.nn.Module, mixer: ArwkvTimeMix, teacher_config) -> None:
    """Copy init of one mixer from the teacher's attention module (see the module docstring)."""
    kv_heads = teacher_config.num_key_value_heads or teacher_config.num_attention_heads
    groups = teacher_config.num_attention_heads // kv_heads
    e = mixer.dim // (teacher_config.num_attention_heads * mixer.teacher_head_dim)  # mixer_expand

    def heads(t: torch.Tensor | None, per_kv_head: bool = False) -> torch.Tensor | None:
        """Teacher rows [D_t, ...] -> mixer rows [e * D_t, ...] (KV rows repeated per query head first)."""
        if t is None:
            return None
        if per_kv_head:
            t = _repeat_kv_rows(t, kv_heads, groups)
        return t.repeat(e, *([1] * (t.dim() - 1)))

    pairs = [
        (mixer.receptance, heads(attn.q_proj.weight), heads(attn.q_proj.bias)),
        (mixer.key, heads(attn.k_proj.weight, True), heads(attn.k_proj.bias, True)),
        (mixer.value, heads(attn.v_proj.weight, True), heads(attn.v_proj.bias, True)),
        (mixer.output, attn.o_proj.weight.repeat(1, e) / e, attn.o_proj.bias),
    ]
    for linear, weight, bias in pairs:
        if linear.weight.shape != weight.shape:
            raise ValueError(
                f"copy init: {tuple(weight.shape)} teacher weight for {tuple(linear.weight.shape)}"
            )
        linear.weight.copy_(weight)
        if linear.bias is not None:  # a bias the teacher lacks starts at 0 (exact)
            linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))
        # a teacher bias the mixer lacks (rkv_bias/output_bias=false, ARWKV's and llama.cpp's bias-free
        # layout) is dropped: stage 1 re-fits what it carried
    if mixer.r_norm is not None:
        if getattr(attn, "q_norm", None) is None:
            raise ValueError("copy init: use_qk_norm=True but the teacher attention has no q_norm/k_norm.")
        mixer.r_norm.weight.copy_(attn.q_norm.weight)
        mixer.k_norm.weight.copy_(attn.k_norm.weight)
    if getattr(mixer, "version", 7) == 6:
        if mixer.use_token_shift:  # every mix mu + LoRA(x) is exactly 0: each projection sees its own token
            for name in ("x", "w", "k", "v", "r", "g"):
                getattr(mixer, f"time_maa_{name}").zero_()
            mixer.time_maa_w2.zero_()
        return
    if mixer.use_token_shift:
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            getattr(mixer, name).zero_()
    mixer.v0.fill_(COPY_V0)
    if hasattr(mixer, "g1"):
        mixer.g1.zero_()
        noise = torch.randn_like(mixer.g2) * 0.1
        mixer.g2.copy_(2.0 / mixer.g2.shape[0] + noise - noise.mean(dim=0, keepdim=True))


def build_student(
    teacher: PreTrainedModel,
    init: Literal["copy", "fresh"] = "copy",
    untie_embeddings: bool = False,
    **options: Any,
) -> ArwkvForCausalLM:
    """An `ArwkvForCausalLM` built from `teacher` (a supported HF causal LM).

    options: any `ArwkvConfig` mixer option (version, rwkv6_variant, head_size, mixer_expand, use_gate,
    use_group_norm,
    use_token_shift, use_rope, use_qk_norm, rkv_bias, output_bias, lora_ranks, softmax_layers, local_window,
    local_sinks, wkv_backend,
    wkv_chunk_size).
    Tied embeddings stay tied unless `untie_embeddings`. The student gets the teacher's dtype, device and
    train/eval mode.
    """
    if init not in ("copy", "fresh"):
        raise ValueError(f"init must be 'copy' or 'fresh', got {init!r}.")
    check_teacher(teacher)
    tcfg = teacher.config
    kwargs = {**_mixer_defaults(teacher, init), **options}
    if str(options.get("version", 7)).strip() == "6" and "use_group_norm" not in options:
        # RWKV-6's ln_x, with either init; the qrwkv form has none
        kwargs["use_group_norm"] = options.get("rwkv6_variant", "finch") != "qrwkv"
    tied = bool(getattr(tcfg, "tie_word_embeddings", False))
    config = ArwkvConfig(
        teacher_config=tcfg.to_dict(), tie_word_embeddings=tied and not untie_embeddings, **kwargs
    )
    student = ArwkvForCausalLM._from_config(
        config, dtype=teacher.dtype, attn_implementation=tcfg._attn_implementation
    )
    student.to(teacher.device)
    _copy_shared_weights(teacher, student)
    if init == "copy":
        for i in config.rwkv_layers:
            copy_attention_into_mixer(
                teacher.model.layers[i].self_attn, student.model.layers[i].self_attn, tcfg
            )
    if config.local_window:  # the local branch is the teacher's attention, unchanged
        for i in config.rwkv_layers:
            local = student.model.layers[i].self_attn.local_attn
            local.load_state_dict(teacher.model.layers[i].self_attn.state_dict())
    student.train(teacher.training)
    return student


@torch.no_grad()
def _copy_shared_weights(teacher: PreTrainedModel, student: ArwkvForCausalLM) -> None:
    """Copy every tensor outside the RWKV mixers by name, asserting the key/shape map is one-to-one."""
    mixers = tuple(f"model.layers.{i}.self_attn." for i in student.config.rwkv_layers)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    shared = [k for k in s_sd if not k.startswith(mixers)]
    missing = [k for k in shared if k not in t_sd]
    dropped = [k for k in t_sd if k not in s_sd and not k.startswith(mixers)]
    if missing or dropped:
        raise ValueError(f"teacher/student key map is not one-to-one: missing {missing}, unused {dropped}")
    bad = [(k, tuple(t_sd[k].shape), tuple(s_sd[k].shape)) for k in shared if t_sd[k].shape != s_sd[k].shape]
    if bad:
        raise ValueError(f"teacher/student shapes differ: {bad}")
    for k in shared:
        s_sd[k].copy_(t_sd[k])  # state_dict tensors share storage with the parameters
