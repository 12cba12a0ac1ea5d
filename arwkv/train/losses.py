"""Distillation losses as pure functions.

Every loss returns `(total, count)`: the *sum* of a per-token loss over the counted tokens and the number of
counted tokens. The training loop divides by the global count of the optimizer step (all micro-batches, all
processes), so a step means the same thing however the batch is split.

Per-token losses:
- stage 1, `mse`: mean over layers and channels of (y_T − y_S)²  (RADLADS);
- stage 1, `l2`:  mean over layers of ‖y_T − y_S‖₂ / √C  (ARWKV);
- stage 2, `kl`:  T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)) over the full vocabulary (T² keeps gradient scale
  independent of T, Hinton et al.); optional CE mix. From a teacher cache (`TeacherTopK`) the same KL is
  taken over k+1 buckets: the teacher's top-k tokens and one bucket for the rest of the vocabulary;
- stage 3, `ce`:  cross-entropy of the next token, labels shifted exactly once;
- stage 3, `dpo`: −log σ(β·margin) per preference pair, from completion log-probs of policy and reference
  (`sequence_logprobs`, `dpo_loss`); the count is the number of pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from arwkv.ops.divergence import TeacherTopK, kl_per_token, topk_kl_per_token


def _flat_mask(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return mask.to(device=device).bool()


# ------------------------------------------------------------------------------------------------ stage 1


def output_match_loss(
    student_out: Sequence[Tensor],
    teacher_out: Sequence[Tensor],
    mask: Tensor | None = None,
    kind: str = "mse",
) -> tuple[Tensor, Tensor]:
    """Stage-1 output matching over layers. `student_out[l]`, `teacher_out[l]`: [B, T, C]; mask [B, T] (1 =
    real).

    Returns (sum over counted tokens of the per-token loss averaged over layers, number of counted tokens).
    """
    if len(student_out) != len(teacher_out) or not student_out:
        raise ValueError(
            f"need the same non-zero number of layers, got {len(student_out)} and {len(teacher_out)}"
        )
    m = _flat_mask(mask, student_out[0].shape[:2], student_out[0].device)
    per_token = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    for ys, yt in zip(student_out, teacher_out, strict=True):
        d = ys.float() - yt.float()
        if kind == "mse":
            per_token = per_token + d.pow(2).mean(-1)
        elif kind == "l2":
            per_token = per_token + d.norm(dim=-1) / d.shape[-1] ** 0.5
        else:
            raise ValueError(f"unknown stage-1 loss {kind!r} (mse or l2)")
    per_token = per_token / len(student_out)
    return (per_token * m).sum(), m.sum()


# ------------------------------------------------------------------------------------------------ stage 2


def kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Forward KL(p_T ‖ p_S) on logits [B, T, V], computed `chunk_size` tokens at a time.

    Each chunk's float32 softmax intermediates are recomputed in backward (checkpoint), so peak extra
    memory is O(chunk_size x V) rather than O(B x T x V) on top of the logits themselves. Use
    `kl_loss_from_hidden` to avoid materialising the logits at all.
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :v].reshape(-1, v)
    t = teacher_logits[..., :v].reshape(-1, v)
    m = _flat_mask(mask, student_logits.shape[:-1], s.device).reshape(-1)
    idx = m.nonzero().squeeze(-1)
    total = s.new_zeros((), dtype=torch.float32)
    # one gather, then split: autograd joins the chunk gradients with one cat instead of a full-size zero
    # tensor per chunk
    for a, b in zip(s[idx].split(chunk_size), t[idx].split(chunk_size), strict=True):
        total = total + _ckpt(lambda a, b: kl_per_token(a, b, temperature).sum(), a, b)
    return total, m.sum()


def _ckpt(fn, *args: Tensor) -> Tensor:
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def kl_loss_from_hidden(
    student_hidden: Tensor,
    student_head: torch.nn.Module,
    teacher_logits_fn,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """KL(p_T ‖ p_S) [+ ce_weight·CE] without ever holding a [B·T, V] tensor.

    student_hidden: [B, T, C] final-norm output; student_head: the lm_head. `teacher_logits_fn(index)`
    returns the teacher's logits [n, V_T] for flat token positions `index` (called under no_grad), or its
    cached `TeacherTopK` for them (then the bucketed top-k KL is used).
    Each chunk applies the head inside a checkpoint, so backward recomputes it chunk by chunk.
    labels: [B, T] next-token ids aligned to positions (already shifted; -100 = no target), used only when
    ce_weight > 0. The CE sum is normalised by the same count as the KL.
    Returns (loss sum, count, {"kl": kl sum, "ce": ce sum}).
    """
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    m = _flat_mask(mask, student_hidden.shape[:-1], h.device).reshape(-1)
    idx = m.nonzero().squeeze(-1)
    flat_labels = labels.reshape(-1) if labels is not None else None
    kl_total = h.new_zeros((), dtype=torch.float32)
    ce_total = h.new_zeros((), dtype=torch.float32)
    for i, hj in zip(range(0, idx.numel(), chunk_size), h[idx].split(chunk_size), strict=True):
        j = idx[i : i + chunk_size]
        with torch.no_grad():
            t = teacher_logits_fn(j)
        kl_fn = topk_kl_per_token if isinstance(t, TeacherTopK) else kl_per_token
        if ce_weight > 0 and flat_labels is not None:
            y = flat_labels[j]

            def chunk_fn(x, t=t, y=y, kl_fn=kl_fn):
                z = student_head(x)
                return torch.stack(
                    [kl_fn(z, t, temperature).sum(), F.cross_entropy(z.float(), y, reduction="sum")]
                )

            kc = _ckpt(chunk_fn, hj)
            kl_total, ce_total = kl_total + kc[0], ce_total + kc[1]
        else:
            kl_total = kl_total + _ckpt(
                lambda x, t=t, kl_fn=kl_fn: kl_fn(student_head(x), t, temperature).sum(), hj
            )
    return kl_total + ce_weight * ce_total, m.sum(), {"kl": kl_total.detach(), "ce": ce_total.detach()}


# ------------------------------------------------------------------------------------------------ stage 3 /
# NLL


def shift_labels(
    input_ids: Tensor, loss_mask: Tensor | None = None, position_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Labels for next-token prediction, shifted exactly once.

    Position t predicts token t+1: labels[:, t] = input_ids[:, t+1], weight[:, t] = loss_mask[:, t+1] (the
    mask marks *tokens* that count). The last position has no target. A target that starts a new packed
    document (position_ids == 0) is not predicted from the previous document.
    """
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    weight = torch.zeros_like(input_ids, dtype=torch.bool)
    tgt = (
        torch.ones_like(input_ids[:, 1:], dtype=torch.bool) if loss_mask is None else loss_mask[:, 1:].bool()
    )
    if position_ids is not None:
        tgt = tgt & (position_ids[:, 1:] != 0)
    weight[:, :-1] = tgt
    return labels, weight


def masked_ce(
    logits: Tensor,
    input_ids: Tensor,
    loss_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chunk_size: int = 0,
) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy on logits [B, T, V] with one shift; returns (sum, count)."""
    labels, weight = shift_labels(input_ids, loss_mask, position_ids)
    z = logits.reshape(-1, logits.shape[-1])
    idx = weight.reshape(-1).nonzero().squeeze(-1)
    y = labels.reshape(-1)
    total = z.new_zeros((), dtype=torch.float32)
    step = chunk_size if chunk_size > 0 else max(idx.numel(), 1)
    for zj, yj in zip(z[idx].split(step), y[idx].split(step), strict=True):
        total = total + _ckpt(lambda a, yj=yj: F.cross_entropy(a.float(), yj, reduction="sum"), zj)
    return total, weight.sum()


def ce_loss_from_hidden(
    hidden: Tensor,
    head: torch.nn.Module,
    input_ids: Tensor,
    loss_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """`masked_ce` without the [B·T, V] logits: the head is applied per chunk inside a checkpoint."""
    labels, weight = shift_labels(input_ids, loss_mask, position_ids)
    h = hidden.reshape(-1, hidden.shape[-1])
    idx = weight.reshape(-1).nonzero().squeeze(-1)
    y = labels.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for hj, yj in zip(h[idx].split(chunk_size), y[idx].split(chunk_size), strict=True):
        total = total + _ckpt(lambda x, yj=yj: F.cross_entropy(head(x).float(), yj, reduction="sum"), hj)
    return total, weight.sum()


# ------------------------------------------------------------------------------------------------ stage 3,
# DPO


def sequence_logprobs(
    hidden: Tensor,
    head: torch.nn.Module,
    input_ids: Tensor,
    loss_mask: Tensor,
    position_ids: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Summed log-probability of the tokens marked in `loss_mask` [N, T], per row: [N] (float32).

    Shifted once like `shift_labels`: token t+1 is scored from position t when loss_mask[:, t+1] = 1, so the
    mask marks the completion *tokens*; padding and prompt tokens are never scored. The head is applied a
    chunk of positions at a time inside a checkpoint, as for the CE and KL losses.
    """
    labels, weight = shift_labels(input_ids, loss_mask, position_ids)
    h = hidden.reshape(-1, hidden.shape[-1])
    idx = weight.reshape(-1).nonzero().squeeze(-1)
    y = labels.reshape(-1)
    row = idx // input_ids.shape[1]
    out = h.new_zeros(input_ids.shape[0], dtype=torch.float32)
    for i, hj in zip(range(0, idx.numel(), chunk_size), h[idx].split(chunk_size), strict=True):
        yj = y[idx[i : i + chunk_size]]
        lp = _ckpt(
            lambda x, yj=yj: -F.cross_entropy(head(x).float(), yj, reduction="none"),
            hj,
        )
        out = out.index_add(0, row[i : i + chunk_size], lp)
    return out


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al. 2023) over pairs, from summed completion log-probs [P] of policy and reference.

    Per pair: −log σ(β·[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)]). Returns (sum over pairs,
    number of pairs, extra sums): `chosen_reward` / `rejected_reward` (β·log-ratio of each completion),
    `margin` (their difference) and `reward_acc` (1 where the chosen reward is higher, ½ on a tie, so a
    policy equal to its reference scores 0.5).
    """
    chosen = beta * (policy_chosen.float() - ref_chosen.float())
    rejected = beta * (policy_rejected.float() - ref_rejected.float())
    margin = chosen - rejected
    loss = -F.logsigmoid(margin)
    with torch.no_grad():
        acc = (margin > 0).float() + 0.5 * (margin == 0).float()
    extras = {
        "chosen_reward": chosen.detach().sum(),
        "rejected_reward": rejected.detach().sum(),
        "margin": margin.detach().sum(),
        "reward_acc": acc.sum(),
    }
    return loss.sum(), torch.tensor(margin.shape[0], device=margin.device), extras
