"""Forward helpers shared by the stage recipes and held-out metrics.

Losses over a full vocabulary are computed from the final hidden states, a chunk of tokens at a time, so these
helpers return `(hidden [B, T, C], head)` instead of logits. Batches follow the design contract: `input_ids`,
`position_ids` (reset per packed document), `attention_mask` (1 = real token), optional `loss_mask`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers` of an HF causal LM (the teacher and the student share module names)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} has no model.layers; expected a Hugging Face decoder-only LM"
        )
    return layers


def base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    if base is None or head is None:
        raise TypeError(f"{type(model).__name__}: expected `.model` and an output embedding (lm_head)")
    return base, _SoftcappedHead(head, getattr(model.config, "final_logit_softcapping", None))


class _SoftcappedHead(nn.Module):
    """lm_head, with the teacher's final logit soft-capping (Gemma-2) when it has one."""

    def __init__(self, head: nn.Module, cap: float | None) -> None:
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(x)
        return z if not self.cap else torch.tanh(z / self.cap) * self.cap


def _needs_mask(batch: Batch) -> bool:
    """A mask is needed only for padding that precedes real tokens: right padding cannot change the outputs
    at real positions of a causal model, and its loss is masked anyway."""
    m = batch.get("attention_mask")
    if m is None:
        return False
    m = m.bool()
    return bool((m[:, 1:] & ~m[:, :-1]).any())  # a real token after a padded one


def _is_packed(position_ids: Tensor) -> bool:
    return bool((position_ids[:, 1:] - position_ids[:, :-1] != 1).any())


def packed_padding_mask(position_ids: Tensor, attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive [B, 1, T, T] mask: causal, block-diagonal over packed documents, padding keys removed."""
    t = position_ids.shape[1]
    starts = torch.cat(
        [torch.ones_like(position_ids[:, :1]), (position_ids[:, 1:] - position_ids[:, :-1] != 1).long()],
        dim=1,
    )
    doc = starts.cumsum(-1)  # [B, T] document index
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = causal & (doc[:, :, None] == doc[:, None, :]) & attention_mask.bool()[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool, device=position_ids.device)  # padded rows: avoid all -inf rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def model_inputs(batch: Batch, dtype: torch.dtype = torch.float32, recurrent: bool = False) -> dict[str, Any]:
    """kwargs for an HF decoder forward.

    Without left or inner padding the mask is dropped, so packed documents are found from `position_ids`
    (transformers' rule, which the arwkv student follows too: its state resets there). Otherwise the student
    (`recurrent`) takes the 2D mask; a softmax teacher gets an additive 4D mask when rows are also packed.
    """
    ids = batch["input_ids"]
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if not _needs_mask(batch):
        return {"input_ids": ids, "position_ids": pos, "attention_mask": None}
    mask = batch["attention_mask"]
    if _is_packed(pos) and not recurrent:
        mask = packed_padding_mask(pos, mask, dtype)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}


def hidden_states(model: nn.Module, batch: Batch) -> tuple[Tensor, nn.Module]:
    """Final-norm hidden states [B, T, C] and the (soft-capped) head of an HF causal LM."""
    base, head = base_and_head(model)
    dtype = next(model.parameters()).dtype
    recurrent = getattr(model.config, "model_type", "") == "arwkv"
    out = base(**model_inputs(batch, dtype, recurrent), use_cache=False)
    return out[0], head
