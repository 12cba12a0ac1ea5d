"""Held-out metrics of a student against its teacher: KL(p_T ‖ p_S), NLL of the actual next token (and its
ratio to
the teacher's), top-1 agreement, and top-1 agreement on confident teacher positions (max p_T ≥ confident_p;
plain top-1 is a poor metric for a high-entropy teacher). Logits are formed a chunk of tokens at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from arwkv.ops.divergence import kl_from_log_probs, shared_log_probs
from arwkv.train.forward import Batch, base_and_head, hidden_states
from arwkv.train.losses import shift_labels


def _hidden(model: nn.Module, batch: Batch):
    """hidden_states(), also for `arwkv.eval.baselines.SinkWindowBaseline` (the teacher seen through another
    attention implementation, switched on only for its own forward)."""
    impl, inner = getattr(model, "impl", None), getattr(model, "teacher", None)
    if impl is None or inner is None:
        return hidden_states(model, batch)
    config = inner.config
    previous, config._attn_implementation = config._attn_implementation, impl
    try:
        return hidden_states(inner, batch)
    finally:
        config._attn_implementation = previous


@torch.no_grad()
def heldout_metrics(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[Batch],
    *,
    confident_p: float = 0.5,
    chunk_size: int = 2048,
    device: torch.device | None = None,
    teacher_cache: dict[int, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Token-weighted means over every predicted position of `batches` (padding and document starts
    excluded). `teacher_cache` (batch index -> teacher hidden states) is filled on the first call and reused
    afterwards: the teacher's side of a fixed held-out set never changes."""
    device = device or next(student.parameters()).device
    sums = {k: 0.0 for k in ("nll", "teacher_nll", "kl", "top1", "confident", "top1_confident")}
    n = 0
    for bi, b in enumerate(batches):
        b = {k: v.to(device) for k, v in b.items()}
        labels, weight = shift_labels(b["input_ids"], b.get("attention_mask"), b.get("position_ids"))
        idx = weight.reshape(-1).nonzero().squeeze(-1)
        y_all = labels.reshape(-1)
        h_s, head_s = _hidden(student, b)
        h_s = h_s.reshape(-1, h_s.shape[-1])
        if teacher is not None:
            head_t = base_and_head(teacher)[1]
            if teacher_cache is not None and bi in teacher_cache:
                h_t = teacher_cache[bi].to(device)
            else:
                h_t = hidden_states(teacher, b)[0]
                h_t = h_t.reshape(-1, h_t.shape[-1])
                if teacher_cache is not None:
                    teacher_cache[bi] = h_t
        for i in range(0, idx.numel(), chunk_size):
            j = idx[i : i + chunk_size]
            y = y_all[j]
            z_s = head_s(h_s[j])
            if teacher is None:
                sums["nll"] += -F.log_softmax(z_s.float(), -1).gather(1, y[:, None]).sum().item()
                continue
            log_ps, log_pt = shared_log_probs(z_s, head_t(h_t[j]))
            y = y.clamp_max(log_ps.shape[-1] - 1)
            pt = log_pt.exp()
            sums["nll"] += -log_ps.gather(1, y[:, None]).sum().item()
            sums["teacher_nll"] += -log_pt.gather(1, y[:, None]).sum().item()
            sums["kl"] += kl_from_log_probs(log_ps, log_pt).sum().item()
            agree = log_ps.argmax(-1) == log_pt.argmax(-1)
            conf = pt.max(-1).values >= confident_p
            sums["top1"] += agree.sum().item()
            sums["confident"] += conf.sum().item()
            sums["top1_confident"] += (agree & conf).sum().item()
        n += idx.numel()
    n = max(n, 1)
    out = {"nll": sums["nll"] / n, "tokens": float(n)}
    if teacher is not None:
        out.update(
            teacher_nll=sums["teacher_nll"] / n,
            nll_ratio=sums["nll"] / max(sums["teacher_nll"], 1e-12),
            kl=sums["kl"] / n,
            top1=sums["top1"] / n,
            top1_confident=sums["top1_confident"] / max(sums["confident"], 1.0),
            confident_frac=sums["confident"] / n,
        )
    return out


def iter_batches(tensors: dict[str, torch.Tensor], batch_size: int) -> Iterator[Batch]:
    """Fixed, unshuffled batches over every row of a dict of [N, T] tensors (held-out sets)."""
    n = tensors["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        b = {k: v[i : i + batch_size] for k, v in tensors.items()}
        ids = b["input_ids"]
        b.setdefault("attention_mask", torch.ones_like(ids))
        b.setdefault("position_ids", torch.arange(ids.shape[1]).expand_as(ids).contiguous())
        yield b
