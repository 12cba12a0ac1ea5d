"""Stage 2 — knowledge distillation (method.md §4).

The student now runs on its own residual stream. Loss per token: forward KL(p_T || p_S) over the full
vocabulary at temperature T (default 1), plus `ce_weight` x next-token CE (default 0). Logits are formed from
the final hidden states a chunk of tokens at a time, so memory stays bounded for 150k vocabularies. The
teacher may be a larger model with the same tokenizer: padded vocabularies are reconciled by truncating to
the smaller one. Everything trains by default (freeze switches per group); the mixers can have their own
learning rate; lm_head is untied (by `build_student(untie_embeddings=True)`, recorded in config and report).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from arwkv.config import StageConfig
from arwkv.train.forward import Batch, hidden_states
from arwkv.train.loop import LoopResult, train
from arwkv.train.losses import kl_loss_from_hidden, shift_labels
from arwkv.train.params import param_groups


class DistillTask(nn.Module):
    """forward(batch) -> (KL [+ CE] sum, token count, {"kl", "ce"} sums)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # frozen, not a submodule
        teacher.requires_grad_(False)
        self.temperature, self.ce_weight, self.chunk_size = temperature, ce_weight, chunk_size

    @staticmethod
    def mask(batch: Batch) -> Tensor:
        """Every real position is distilled (the teacher's whole next-token distribution, no label needed)."""
        m = batch.get("attention_mask")
        return torch.ones_like(batch["input_ids"], dtype=torch.bool) if m is None else m.bool()

    def count(self, batch: Batch) -> int:
        return int(self.mask(batch).sum())

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            h_t, head_t = hidden_states(self.teacher, batch)
            h_t = h_t.reshape(-1, h_t.shape[-1])
        h_s, head_s = hidden_states(self.student, batch)
        labels = None
        if self.ce_weight > 0:
            labels, weight = shift_labels(
                batch["input_ids"], batch.get("loss_mask"), batch.get("position_ids")
            )
            labels = labels.masked_fill(~weight, -100)  # ignored by cross_entropy
        total, count, parts = kl_loss_from_hidden(
            h_s,
            head_s,
            lambda j: head_t(h_t[j]),
            mask=self.mask(batch),
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            labels=labels,
            ce_weight=self.ce_weight,
        )
        return total, count, parts


def run_distill(
    student: nn.Module, teacher: nn.Module, data, cfg: StageConfig, run_dir, **loop_kwargs
) -> LoopResult:
    groups = param_groups(student, cfg.lr, cfg.mixer_lr, freeze=cfg.freeze)
    task = DistillTask(student, teacher, cfg.kl_temperature, cfg.ce_weight, cfg.chunk_size)
    return train(task, data, cfg, run_dir, param_groups=groups, desc="distill", **loop_kwargs)
