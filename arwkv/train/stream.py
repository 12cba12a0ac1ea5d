"""A resumable, rank-sharded stream of micro-batches over fixed-length sequences held in memory.

Used for corpora that are already token tensors (the teacher-written data-free corpus, held-out sets,
tests). The global order is a seeded permutation per epoch; optimizer step s consumes global sequences
[s*B, (s+1)*B) and process r takes every world-th of them, so 1 process with accumulation and N processes
see the same global batch. `state_dict()` is the exact position, restored by `load_state_dict()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


class SequenceStream:
    def __init__(
        self,
        input_ids: Tensor,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        extra: dict[str, Tensor] | None = None,
    ) -> None:
        """input_ids: [N, T]; extra: other [N, T] tensors carried along (attention_mask, loss_mask,
        position_ids)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [N, T], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] < micro_batch_size * world_size:
            raise ValueError(
                f"{input_ids.shape[0]} sequences cannot fill one batch of "
                f"{micro_batch_size} x {world_size} processes"
            )
        self.tensors = {"input_ids": input_ids, **(extra or {})}
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0  # cursor: global sequences consumed in this epoch
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> Tensor:
        n = self.tensors["input_ids"].shape[0]
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        span = self.micro_batch_size * self.world_size
        if self.cursor + span > self._order.numel():  # drop the ragged tail, start a new epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        idx = self._order[self.cursor + self.rank : self.cursor + span : self.world_size]
        self.cursor += span
        batch = {k: v[idx] for k, v in self.tensors.items()}
        ids = batch["input_ids"]
        batch.setdefault("attention_mask", torch.ones_like(ids))
        batch.setdefault("position_ids", torch.arange(ids.shape[1]).expand_as(ids).contiguous())
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._perm(self.epoch)


def batches(tensors: dict[str, Tensor], batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Fixed, unshuffled batches over every sequence (held-out evaluation)."""
    n = tensors["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        b = {k: v[i : i + batch_size] for k, v in tensors.items()}
        b.setdefault("attention_mask", torch.ones_like(b["input_ids"]))
        ids = b["input_ids"]
        b.setdefault("position_ids", torch.arange(ids.shape[1]).expand_as(ids).contiguous())
        yield b
