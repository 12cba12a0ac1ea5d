"""Teacher families arwkv converts, as data. Anything else raises `UnsupportedArchitectureError`.

Family differences live here and in the teacher's own transformers classes, never in branches of the
student's forward: the student instantiates the family's RMSNorm / MLP / attention / rotary classes by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedConfig, PreTrainedModel

from arwkv.errors import UnsupportedArchitectureError
from arwkv.models.arwkv.modeling_arwkv import TEACHER_FAMILIES

# Every supported teacher's attention has these four projections (HF naming).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TeacherFamily:
    model_type: str
    name: str
    attention_features: str  # what the copy init has to carry over from the attention


FAMILIES: dict[str, TeacherFamily] = {
    f.model_type: f
    for f in (
        TeacherFamily(
            "llama", "Llama 2/3 (incl. Llama-3 RoPE scaling), SmolLM, SmolLM2", "GQA; optional biases"
        ),
        TeacherFamily("mistral", "Mistral", "GQA; sliding-window attention in kept softmax layers"),
        TeacherFamily("qwen2", "Qwen2 / Qwen2.5", "GQA; q/k/v biases"),
        TeacherFamily("qwen3", "Qwen3 (dense)", "GQA; per-head q/k RMSNorm"),
    )
}
assert set(FAMILIES) == set(TEACHER_FAMILIES), "families.py and modeling_arwkv.TEACHER_FAMILIES disagree"

NEEDED_FOR_NEW_FAMILY = (
    "a decoder-only causal LM with pre-norm blocks `model.layers[i].{input_layernorm, self_attn, "
    "post_attention_layernorm, mlp}`, attention with separate q_proj/k_proj/v_proj/o_proj, RoPE, "
    "no mixture-of-experts or cross-layer KV sharing; then an entry in arwkv/convert/families.py and "
    "TEACHER_FAMILIES in arwkv/models/arwkv/modeling_arwkv.py, and a tiny-teacher test in tests/convert"
)


def supported_summary() -> str:
    return "; ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values())


def check_teacher(teacher: PreTrainedModel | PreTrainedConfig) -> TeacherFamily:
    """The teacher's family, or `UnsupportedArchitectureError` saying what is supported and what is needed."""
    config = teacher.config if isinstance(teacher, PreTrainedModel) else teacher
    model_type = getattr(config, "model_type", None)
    arch = ", ".join(getattr(config, "architectures", None) or [type(teacher).__name__])
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"Teacher architecture {model_type!r} ({arch}) is not supported. "
            f"Supported: {supported_summary()}. "
            f"Converting it would need {NEEDED_FOR_NEW_FAMILY}."
        )
    if isinstance(teacher, PreTrainedModel):
        layers = getattr(getattr(teacher, "model", None), "layers", None)
        if layers is None or not hasattr(teacher, "lm_head"):
            raise UnsupportedArchitectureError(
                f"Teacher {type(teacher).__name__} is a {model_type} model but not a causal LM with "
                "`model.layers` and `lm_head`; load it with AutoModelForCausalLM."
            )
        attn = layers[0].self_attn
        missing = [
            p for p in ATTENTION_PROJECTIONS if not isinstance(getattr(attn, p, None), type(teacher.lm_head))
        ]
        if missing:
            raise UnsupportedArchitectureError(
                f"Teacher {model_type} attention lacks linear projections {missing}; "
                f"arwkv needs {NEEDED_FOR_NEW_FAMILY}."
            )
    return FAMILIES[model_type]


# Tiny random teachers, one per family, for tests here and in other packages (hidden 32, 3 layers, vocab 100).
# Each exercises what its family adds: Llama-3 RoPE scaling + GQA + tied embeddings, Mistral's sliding
# window, Qwen2's q/k/v biases, Qwen3's q/k norms with head_dim * heads != hidden_size.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}


def tiny_teacher(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random teacher of `model_type` in eval mode, fp32, eager attention; every tensor is random
    (norm weights and biases too, so that copies are checked against non-trivial values)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    check_teacher(CONFIG_MAPPING[model_type]())
    fields = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = CONFIG_MAPPING[model_type](**{**fields, **TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms (ones) and biases (zeros) after HF's init
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
