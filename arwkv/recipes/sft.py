"""Stage 3 — supervised fine-tuning (method.md §5).

Cross-entropy of the next token on assistant tokens only: the batch's `loss_mask` marks the tokens that count
(built by the data layer from the teacher's chat template), and labels are shifted exactly once — position t
predicts token t+1, weighted by loss_mask[t+1] (ARWKV's SFT code shifts twice; see tests/recipes). No teacher.
"""

from __future__ import annotations

from torch import Tensor, nn

from arwkv.config import SFTConfig
from arwkv.train.forward import Batch, hidden_states
from arwkv.train.loop import LoopResult, train
from arwkv.train.losses import ce_loss_from_hidden, shift_labels
from arwkv.train.params import param_groups


class SFTTask(nn.Module):
    """forward(batch) -> (CE sum over assistant tokens, their count, {})."""

    def __init__(self, student: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.student, self.chunk_size = student, chunk_size

    def count(self, batch: Batch) -> int:
        return int(
            shift_labels(batch["input_ids"], batch.get("loss_mask"), batch.get("position_ids"))[1].sum()
        )

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h, head = hidden_states(self.student, batch)
        total, count = ce_loss_from_hidden(
            h, head, batch["input_ids"], batch.get("loss_mask"), batch.get("position_ids"), self.chunk_size
        )
        return total, count, {}


def run_sft(student: nn.Module, data, cfg: SFTConfig, run_dir, **loop_kwargs) -> LoopResult:
    groups = param_groups(student, cfg.lr, cfg.mixer_lr, freeze=cfg.freeze)
    return train(
        SFTTask(student, cfg.chunk_size), data, cfg, run_dir, param_groups=groups, desc="sft", **loop_kwargs
    )
