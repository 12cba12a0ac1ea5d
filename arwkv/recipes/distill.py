"""Stage 2 — knowledge distillation (method.md §4).

The student now runs on its own residual stream. Loss per token: forward KL(p_T || p_S) over the full
vocabulary at temperature T (default 1), plus `ce_weight` x next-token CE (default 0). Logits are formed from
the final hidden states a chunk of tokens at a time, so memory stays bounded for 150k vocabularies. The
teacher may be a larger model with the same tokenizer: padded vocabularies are reconciled by truncating to
the smaller one. Everything trains by default (freeze switches per group); the mixers can have their own
learning rate; lm_head is untied (by `build_student(untie_embeddings=True)`, recorded in config and report).

With `distill.teacher_topk: k` the teacher's distribution comes from a `TeacherCache` (top-k + tail, on disk):
the teacher runs only on rows the cache has not seen, and the KL is taken over k+1 buckets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from arwkv.config import DistillConfig
from arwkv.data.teacher_cache import TeacherCache
from arwkv.ops.divergence import TeacherTopK, teacher_topk
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
        cache: TeacherCache | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # frozen, not a submodule
        teacher.requires_grad_(False)
        self.temperature, self.ce_weight, self.chunk_size = temperature, ce_weight, chunk_size
        self.cache = cache
        self.teacher_rows = 0  # rows the teacher had to run on (cache misses)

    @staticmethod
    def mask(batch: Batch) -> Tensor:
        """Every real position is distilled (the teacher's whole next-token distribution, no label needed)."""
        m = batch.get("attention_mask")
        return torch.ones_like(batch["input_ids"], dtype=torch.bool) if m is None else m.bool()

    def count(self, batch: Batch) -> int:
        return int(self.mask(batch).sum())

    def _teacher_fn(self, batch: Batch, vocab: int):
        """index -> the teacher's logits (online) or its cached TeacherTopK for flat positions `index`."""
        if self.cache is None:
            with torch.no_grad():
                h_t, head_t = hidden_states(self.teacher, batch)
                h_t = h_t.reshape(-1, h_t.shape[-1])
            return lambda j: head_t(h_t[j])
        if "row_ids" not in batch:
            raise ValueError("a cached teacher needs batches with row_ids (PackedLoader(with_row_ids=True))")
        rows = batch["row_ids"].cpu().numpy()
        missing = self.cache.missing(rows)
        if len(missing):
            first = {int(r): i for i, r in reversed(list(enumerate(rows)))}
            sel = torch.tensor([first[int(r)] for r in missing])
            sub = {k: v[sel] for k, v in batch.items() if k != "row_ids"}
            with torch.no_grad():
                h_t, head_t = hidden_states(self.teacher, sub)
                parts = [
                    teacher_topk(head_t(h_t[i])[..., :vocab], self.cache.meta["k"], self.temperature)
                    for i in range(len(sel))  # one row at a time: [T, V] logits, never [B, T, V]
                ]
            top = TeacherTopK.stack(parts)
            self.cache.store(missing, top.ids, top.logp, top.tail_logp)
            self.teacher_rows += len(missing)
        ids, logp, tail = self.cache.fetch(rows)
        dev = batch["input_ids"].device
        top = TeacherTopK(
            ids.reshape(-1, ids.shape[-1]).to(dev),
            logp.reshape(-1, ids.shape[-1]).to(dev),
            tail.reshape(-1).to(dev),
        )
        return lambda j: top[j]

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        vocab = self.student.get_output_embeddings().weight.shape[0]
        teacher_fn = self._teacher_fn(batch, vocab)
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
            teacher_fn,
            mask=self.mask(batch),
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            labels=labels,
            ce_weight=self.ce_weight,
        )
        return total, count, parts


def run_distill(
    student: nn.Module, teacher: nn.Module, data, cfg: DistillConfig, run_dir, **loop_kwargs
) -> LoopResult:
    groups = param_groups(student, cfg.lr, cfg.mixer_lr, freeze=cfg.freeze)
    cache = loop_kwargs.pop("teacher_cache", None)
    task = DistillTask(student, teacher, cfg.kl_temperature, cfg.ce_weight, cfg.chunk_size, cache=cache)
    return train(task, data, cfg, run_dir, param_groups=groups, desc="distill", **loop_kwargs)
