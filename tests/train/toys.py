"""Tiny stand-ins for the train/recipe tests: a random Llama teacher and a "student" that is a copy of it
whose
attention is replaced by a cheap causal mixer with the arwkv mixer signature."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_teacher(seed: int = 0, vocab: int = VOCAB, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


class ToyMixer(nn.Module):
    """Causal running mean of a projection, with the mixer signature `(out, v_first, state)`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mu = nn.Parameter(torch.zeros(dim))

    def forward(
        self,
        hidden_states,
        v_first=None,
        attention_mask=None,
        layer_state=None,
        cu_seqlens=None,
        position_embeddings=None,
    ):
        x = hidden_states
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        v = self.v(x + (prev - x) * self.mu)
        if v_first is None:
            v_first = v
        else:
            v = 0.5 * (v + v_first)
        t = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return self.o(v.cumsum(1) / t), v_first, None


class TeacherAttentionMixer(nn.Module):
    """A copy of the teacher's own attention behind the mixer signature: stage-1 loss must be exactly 0."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = copy.deepcopy(attn)

    def forward(
        self,
        hidden_states,
        v_first=None,
        attention_mask=None,
        layer_state=None,
        cu_seqlens=None,
        position_embeddings=None,
    ):
        out, _ = self.attn(hidden_states, position_embeddings=position_embeddings, attention_mask=None)
        return out, v_first, None


class ToyLayer(nn.Module):
    """Pre-norm decoder layer calling its mixer with the arwkv signature (v_first carried in a holder)."""

    def __init__(self, teacher_layer: nn.Module, mixer: nn.Module, holder: dict) -> None:
        super().__init__()
        self.input_layernorm = copy.deepcopy(teacher_layer.input_layernorm)
        self.self_attn = mixer
        self.post_attention_layernorm = copy.deepcopy(teacher_layer.post_attention_layernorm)
        self.mlp = copy.deepcopy(teacher_layer.mlp)
        self.holder = holder

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.holder.get("first") is self:
            self.holder["v_first"] = None
        h = self.input_layernorm(hidden_states)
        out, self.holder["v_first"], _ = self.self_attn(
            h, v_first=self.holder["v_first"], position_embeddings=position_embeddings
        )
        hidden_states = hidden_states + out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def tiny_student(teacher: LlamaForCausalLM, mixer: str = "toy", seed: int = 1) -> LlamaForCausalLM:
    """Copy of the teacher with every attention replaced; lm_head untied."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    student.config.tie_word_embeddings = False
    student.lm_head.weight = nn.Parameter(teacher.lm_head.weight.detach().clone())
    holder: dict = {}
    layers = []
    for layer in teacher.model.layers:
        m = ToyMixer(teacher.config.hidden_size) if mixer == "toy" else TeacherAttentionMixer(layer.self_attn)
        layers.append(ToyLayer(layer, m, holder))
    holder["first"] = layers[0]
    student.model.layers = nn.ModuleList(layers)
    return student.train()


def teacher_corpus(teacher: LlamaForCausalLM, n: int = 32, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Token sequences sampled from the tiny teacher (the data-free setting in miniature)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(seq_len - 1):
            logits = teacher(ids).logits[:, -1].float()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def real_pair(seed: int = 0, **options):
    """(tiny random Llama teacher, arwkv student built from it with copy init, lm_head untied)."""
    from arwkv.convert.build import build_student
    from arwkv.convert.families import tiny_teacher as family_teacher

    teacher = family_teacher("llama", seed=seed)
    torch.manual_seed(seed + 1)
    student = build_student(teacher, init="copy", untie_embeddings=True, **options).train()
    return teacher, student


def stage_cfg(**kw):
    """A tiny StageConfig for loop tests."""
    from arwkv.config import StageConfig

    base = dict(
        tokens=10_000,
        max_steps=6,
        seq_len=16,
        batch_size=4,
        lr=3e-3,
        min_lr=1e-4,
        warmup_steps=2,
        ckpt_interval=2,
        log_interval=1,
        keep_checkpoints=3,
        loss="kl",
    )
    base.update(kw)
    return StageConfig(**base)
