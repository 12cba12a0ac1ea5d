"""The one teacher → student divergence: KL(p_T ‖ p_S) per position from two sets of logits, or from a
teacher's top-k (k+1 buckets: its top-k tokens and the rest of the vocabulary as one).

Training (`arwkv.train.losses`), the held-out metrics, `arwkv eval`'s agreement task and the experiments all
take their KL from here, so "KL" means the same number everywhere. Vocabularies of different sizes (a padded
embedding matrix) are reconciled by truncating to the shared ids and renormalising over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def shared_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(log p_S, log p_T) [..., V] in fp32 (fp64 stays fp64) at `temperature`, over the shared vocabulary."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return (
        _log_softmax(student_logits[..., :v], temperature),
        _log_softmax(teacher_logits[..., :v], temperature),
    )


def kl_from_log_probs(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    """KL(p_T ‖ p_S) per position, [..., V] → [...]."""
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T²·KL(p_T ‖ p_S) per position, [..., V] → [...] (T² keeps the gradient's scale independent of T)."""
    return kl_from_log_probs(*shared_log_probs(student_logits, teacher_logits, temperature)) * temperature**2


@dataclass
class TeacherTopK:
    """The teacher's next-token distribution kept as its top-k: `ids` [n, k] (int), `logp` [n, k] (log-probs
    at the distillation temperature, any float dtype) and `tail_logp` [n] (log of the remaining mass)."""

    ids: Tensor
    logp: Tensor
    tail_logp: Tensor

    def __getitem__(self, index) -> TeacherTopK:
        return TeacherTopK(self.ids[index], self.logp[index], self.tail_logp[index])

    @staticmethod
    def cat(parts: list[TeacherTopK], dim: int = 0) -> TeacherTopK:
        """Join along an existing dimension (`ids`/`logp` carry one more, trailing, than `tail_logp`)."""
        return TeacherTopK(*(torch.cat([getattr(p, f) for p in parts], dim) for f in _FIELDS))

    @staticmethod
    def stack(parts: list[TeacherTopK], dim: int = 0) -> TeacherTopK:
        """Join along a new dimension, e.g. rows [T, k] → [B, T, k] or steps [B, k] → [B, T, k]."""
        return TeacherTopK(*(torch.stack([getattr(p, f) for p in parts], dim) for f in _FIELDS))


_FIELDS = ("ids", "logp", "tail_logp")


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    """Top-k log-probs of `teacher_logits` [..., V] at `temperature` plus the log of the mass left over."""
    logp = _log_softmax(teacher_logits, temperature)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    # log(1 - sum p_top), computed from the log-probs in fp32; clamped where the top-k hold all the mass
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0 - 1e-7))
    return TeacherTopK(ids, top, tail)


def topk_kl_per_token(student_logits: Tensor, teacher: TeacherTopK, temperature: float = 1.0) -> Tensor:
    """T²·KL over k+1 buckets (the teacher's top-k tokens, the rest of the vocabulary as one bucket) per
    position, [n, V] → [n]. Equals `kl_per_token` when the top-k hold all the teacher's mass, and is never
    larger than it (merging outcomes cannot increase a KL).

    One fused pass over the vocabulary each way (`_TopKKL`, ~5x less CPU time than autograd through
    `topk_kl_per_token_reference`, which the tests hold it to): the student's tail mass is summed directly
    over the tokens outside the teacher's top-k, never as 1 minus the top-k mass."""
    return _TopKKL.apply(student_logits, teacher.ids.long(), teacher.logp, teacher.tail_logp, temperature)


# the log of a tail the student gives (almost) no mass to: the tail bucket then carries no gradient
_MIN_LOG_TAIL = -100.0


class _TopKKL(torch.autograd.Function):
    """Forward: q = softmax(s), s = z / T, in one [n, V] buffer: exp(s - max) once, the top-k gathered, the
    rest summed after zeroing the top-k in place. Backward, with P the teacher's total mass over the buckets:
    dKL/ds_j = q_j (P - p_tail / q_tail) for tail tokens and q_j P - p_j for top-k tokens."""

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, log_p: Tensor, log_p_tail: Tensor, temperature: float) -> Tensor:
        s = _upcast(z)
        if temperature != 1.0:
            s = s / temperature
        m = s.amax(-1, keepdim=True)
        e = torch.sub(s, m).exp_()
        e_top = e.gather(-1, ids)
        z_top = e_top.sum(-1)
        z_tail = e.scatter_(-1, ids, 0.0).sum(-1)
        log_z = torch.log(z_top + z_tail)
        log_q = e_top.log() - log_z[:, None]
        log_q_tail = (torch.log(z_tail) - log_z).clamp(min=_MIN_LOG_TAIL)
        log_p, log_p_tail = log_p.to(s.dtype), log_p_tail.to(s.dtype)
        p, p_tail = log_p.exp(), log_p_tail.exp()
        tail = torch.where(
            p_tail > 0, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail)
        )  # 0 log 0
        kl = (p * (log_p - log_q)).sum(-1) + tail
        ctx.save_for_backward(z, ids, p, p_tail, m.squeeze(-1) + log_z, log_q_tail)
        ctx.temperature = temperature
        return kl * temperature**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        z, ids, p, p_tail, lse, log_q_tail = ctx.saved_tensors
        temperature = ctx.temperature
        s = _upcast(z)
        q = (torch.div(s, temperature) if temperature != 1.0 else s).sub(lse[:, None]).exp_()
        live = (p_tail > 0) & (log_q_tail > _MIN_LOG_TAIL)  # where the tail term has a gradient
        total = p.sum(-1) + torch.where(live, p_tail, 0.0)
        ratio = torch.where(live, p_tail / log_q_tail.exp(), 0.0)
        q_top = q.gather(-1, ids)
        g = q.mul_((total - ratio)[:, None])  # every token as a tail token ...
        g.scatter_(-1, ids, q_top * total[:, None] - p)  # ... then the teacher's top-k tokens
        g.mul_((grad * temperature)[:, None])  # d/dz = (1/T) d/ds, times the T² of the loss
        return g.to(z.dtype), None, None, None, None


def topk_kl_per_token_reference(
    student_logits: Tensor, teacher: TeacherTopK, temperature: float = 1.0
) -> Tensor:
    """`topk_kl_per_token` written with plain autograd ops (two log-sum-exps over the vocabulary)."""
    s = _upcast(student_logits) / temperature
    lse = torch.logsumexp(s, dim=-1)
    ids = teacher.ids.long()
    log_q = s.gather(-1, ids) - lse[:, None]
    # the student's mass outside the teacher's top-k, without subtracting nearly equal numbers
    log_q_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), dim=-1) - lse
    log_q_tail = log_q_tail.clamp(min=_MIN_LOG_TAIL)  # k = V leaves no tail: -inf times a ~0 teacher tail
    log_p, log_p_tail = teacher.logp.to(s.dtype), teacher.tail_logp.to(s.dtype)
    p_tail = log_p_tail.exp()
    tail = torch.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail))  # 0 log 0
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) + tail
    return kl * temperature**2


def _upcast(x: Tensor) -> Tensor:
    """bf16/fp16 logits to fp32 before a softmax; fp64 stays fp64 (exact-mode evaluation)."""
    return x if x.dtype == torch.float64 else x.float()


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)
