"""State tracking: the group word problem (Merrill et al. 2024; RWKV-7 paper §3, App. D).

Input: a word ``x_1 … x_T`` of i.i.d. uniform elements of a finite group G. Target at every position
``t``: the running product ``y_t = x_1 · x_2 ⋯ x_t``. Abelian groups (Z_n) are easy for constant-depth models;
A5 and S5 are the smallest groups whose word problem is NC¹-complete, i.e. (under standard conjectures) out of
reach of a fixed-depth Transformer at growing length but within reach of a fixed-depth RWKV-7 (paper, Thm. 2).

Groups are permutation groups on ``{0, …, n−1}``. A permutation ``p`` is a tuple with ``p[i]`` the image of
``i``. **Composition convention** (fixed here, used everywhere): ``g · h`` means "apply g, then h", i.e.
``(g · h)[i] = h[g[i]]``. So ``y_t`` is the arrangement reached by applying the moves ``x_1, x_2, …`` in
order.

Token layout: ids ``0 … |G|−1`` are group elements (sorted permutations; the identity is id 0), id ``|G|`` is
BOS. The model reads ``[BOS, x_1 … x_T]`` and its output at position ``t`` (``1 ≤ t ≤ T``) is scored against
``y_t``; the BOS position is never scored.

Models: a tiny ``LlamaForCausalLM`` (the Transformer) and the project's RWKV-7 student built from a tiny Llama
(``build_student(..., init="fresh")`` = every attention replaced by an ``ArwkvTimeMix``), sized to the same
parameter count. ``distill`` trains a student converted from the trained Transformer on the teacher's logits.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PermutationGroup",
    "symmetric_group",
    "alternating_group",
    "cyclic_group",
    "get_group",
    "compose",
    "sample_words",
    "running_products",
    "make_batch",
    "transformer_config",
    "make_transformer",
    "make_rwkv7",
    "make_matched_rwkv7",
    "num_params",
    "TrainConfig",
    "train",
    "distill",
    "evaluate",
    "compare_to_teacher",
]


# ----------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------

Perm = tuple[int, ...]


def compose(g: Perm, h: Perm) -> Perm:
    """``g · h``: apply g first, then h (``(g·h)[i] = h[g[i]]``)."""
    return tuple(h[gi] for gi in g)


def _parity(p: Perm) -> int:
    """0 for even permutations, 1 for odd (count of inversions mod 2)."""
    return sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p))) % 2


@dataclass(frozen=True)
class PermutationGroup:
    """A finite permutation group with its multiplication table as index arithmetic.

    ``elements[i]`` is the permutation with token id ``i``; ``table[i, j]`` is the id of
    ``elements[i] · elements[j]``; ``inverse[i]`` the id of the inverse; ``identity`` the id of the identity.
    """

    name: str
    elements: tuple[Perm, ...]
    table: torch.Tensor = field(repr=False)
    inverse: torch.Tensor = field(repr=False)
    identity: int = 0

    @property
    def order(self) -> int:
        return len(self.elements)

    @classmethod
    def from_elements(cls, name: str, elements: Iterable[Perm]) -> PermutationGroup:
        elems = tuple(sorted(set(elements)))
        index = {p: i for i, p in enumerate(elems)}
        n = len(elems)
        try:
            table = torch.tensor([[index[compose(g, h)] for h in elems] for g in elems], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"{name}: the given permutations are not closed under composition") from e
        identity = index[tuple(range(len(elems[0])))]
        inverse = (table == identity).long().argmax(dim=1)
        assert table.shape == (n, n)
        return cls(name=name, elements=elems, table=table, inverse=inverse, identity=identity)


def symmetric_group(n: int) -> PermutationGroup:
    return PermutationGroup.from_elements(f"S{n}", itertools.permutations(range(n)))


def alternating_group(n: int) -> PermutationGroup:
    return PermutationGroup.from_elements(
        f"A{n}", (p for p in itertools.permutations(range(n)) if _parity(p) == 0)
    )


def cyclic_group(n: int) -> PermutationGroup:
    """Z_n as the rotations of n points (abelian; the easy control)."""
    rotations = (tuple((i + s) % n for i in range(n)) for s in range(n))
    return PermutationGroup.from_elements(f"Z{n}", rotations)


def get_group(name: str) -> PermutationGroup:
    """``"S5"``, ``"A5"``, ``"S3"``, ``"Z2"`` … (letter S, A or Z followed by n)."""
    kind, n = name[:1].upper(), name[1:]
    makers: dict[str, Callable[[int], PermutationGroup]] = {
        "S": symmetric_group,
        "A": alternating_group,
        "Z": cyclic_group,
    }
    if kind not in makers or not n.isdigit() or int(n) < 1:
        raise ValueError(f"unknown group {name!r}: use S<n>, A<n> or Z<n>, e.g. 'A5'")
    return makers[kind](int(n))


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def sample_words(
    group: PermutationGroup, batch: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """``[batch, length]`` i.i.d. uniform element ids."""
    return torch.randint(group.order, (batch, length), generator=generator)


def running_products(group: PermutationGroup, words: torch.Tensor) -> torch.Tensor:
    """``y[:, t] = x[:, 0] · x[:, 1] ⋯ x[:, t]`` (ids), by table look-ups left to right."""
    y = torch.empty_like(words)
    acc = torch.full_like(words[:, 0], group.identity)
    for t in range(words.shape[1]):
        acc = group.table[acc, words[:, t]]
        y[:, t] = acc
    return y


def make_batch(
    group: PermutationGroup, batch: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` ``[B, T+1]`` (BOS first) and ``targets`` ``[B, T]`` (the running products)."""
    words = sample_words(group, batch, length, generator)
    bos = torch.full((batch, 1), group.order, dtype=torch.long)
    return torch.cat([bos, words], dim=1), running_products(group, words)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def transformer_config(
    group: PermutationGroup,
    hidden_size: int = 64,
    num_layers: int = 2,
    head_dim: int = 16,
    intermediate_size: int | None = None,
    max_positions: int = 4096,
):
    """A tiny Llama for the task: vocab = |G| elements + BOS, no tokenizer, untied head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=group.order + 1,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=hidden_size // head_dim,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=group.order,
        eos_token_id=None,
        pad_token_id=None,
    )


def make_transformer(config) -> nn.Module:
    from transformers import LlamaForCausalLM

    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def make_rwkv7(config, **mixer_options) -> nn.Module:
    """An all-RWKV-7 LM with the Transformer's non-mixer shape (embeddings, norms, MLPs, head)."""
    from arwkv.convert.build import build_student

    return build_student(make_transformer(config), init="fresh", **mixer_options)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_matched_rwkv7(group: PermutationGroup, target_params: int, mixer_options: dict | None = None, **kw):
    """An RWKV-7 LM whose parameter count is closest to ``target_params`` (usually the Transformer's).

    The time mix has more parameters than attention (LoRAs, decay, bonus, gate), so the RWKV-7 model gets a
    narrower MLP; everything else (width, depth, heads, vocabulary) is the Transformer's.
    Returns ``(model, llama_config_it_was_built_from)``.
    """
    mixer_options = mixer_options or {}

    def build(inter: int):
        return make_rwkv7(transformer_config(group, intermediate_size=inter, **kw), **mixer_options)

    base, plus = num_params(build(8)), num_params(build(16))
    per_unit = (plus - base) / 8  # params are linear in the MLP width
    inter = max(8, round(8 + (target_params - base) / per_unit))
    config = transformer_config(group, intermediate_size=inter, **kw)
    return make_rwkv7(config, **mixer_options), config


# ----------------------------------------------------------------------------------------------------------
# Training, distillation, evaluation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    length: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Scored logits ``[B, T, |G|]``: drop the BOS position and the BOS column of the vocabulary."""
    return model(input_ids=input_ids).logits[:, 1:, :-1]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on vectors (norms, decay/bonus parameters): decaying them toward 0 changes their meaning
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _run_loop(
    model: nn.Module,
    group: PermutationGroup,
    cfg: TrainConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    state: dict | None,
    on_log: Callable[[dict], None] | None,
    checkpoint: Callable[[dict], None] | None,
    checkpoint_every: int,
) -> list[dict]:
    """The one loop behind ``train`` and ``distill``; ``loss_fn(input_ids, targets) -> (loss, logits)``."""
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    if state is not None:  # resume: model, optimizer, data stream and log continue where they stopped
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, history = state["step"], state["history"]
    model.train()
    t0, run_loss, run_acc, n = time.perf_counter(), 0.0, 0.0, 0
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        input_ids, targets = make_batch(group, cfg.batch_size, cfg.length, gen)
        loss, logits = loss_fn(input_ids, targets)
        if not torch.isfinite(loss):
            from arwkv.errors import TrainingDivergedError

            raise TrainingDivergedError(f"loss is {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        run_loss += loss.item()
        run_acc += (logits.argmax(-1) == targets).float().mean().item()
        n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {
                "step": step + 1,
                "loss": run_loss / n,
                "token_acc": run_acc / n,
                "lr": _lr_at(step, cfg),
                "sec": time.perf_counter() - t0,
            }
            history.append(rec)
            if on_log:
                on_log(rec)
            run_loss, run_acc, n = 0.0, 0.0, 0
        if checkpoint and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
            checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "step": step + 1,
                    "history": history,
                }
            )
    model.eval()
    return history


def train(
    model: nn.Module,
    group: PermutationGroup,
    cfg: TrainConfig,
    *,
    state: dict | None = None,
    on_log: Callable[[dict], None] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 500,
) -> list[dict]:
    """Train from scratch on the word problem: mean token cross-entropy at every position."""

    def loss_fn(input_ids, targets):
        logits = _logits(model, input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), logits

    return _run_loop(model, group, cfg, loss_fn, state, on_log, checkpoint, checkpoint_every)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    group: PermutationGroup,
    cfg: TrainConfig,
    *,
    temperature: float = 1.0,
    state: dict | None = None,
    on_log: Callable[[dict], None] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 500,
) -> list[dict]:
    """Distil ``teacher`` into ``student`` on task inputs: KL(teacher ‖ student) on the logits, no labels.

    Targets are only used to report accuracy, so the student can learn no more than the teacher shows it at
    the training length; what it does beyond that length is the question.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(input_ids, targets):
        with torch.no_grad():
            t_logp = F.log_softmax(_logits(teacher, input_ids) / temperature, dim=-1)
        logits = _logits(student, input_ids)
        s_logp = F.log_softmax(logits / temperature, dim=-1)
        kl = F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
        return kl * temperature**2, logits

    return _run_loop(student, group, cfg, loss_fn, state, on_log, checkpoint, checkpoint_every)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    group: PermutationGroup,
    lengths: Iterable[int],
    num_sequences: int = 256,
    batch_size: int = 64,
    seed: int = 1234,
) -> dict[int, dict[str, float]]:
    """Accuracy per length on fresh words (a seed disjoint from training's stream).

    ``token_acc``: fraction of positions whose running product is right; ``seq_acc``: fraction of words right
    at every position; ``last_acc``: right at the last position (the word problem's classic form).
    """
    model.eval()
    out = {}
    for length in lengths:
        gen = torch.Generator().manual_seed(seed + length)
        tok = seq = last = 0.0
        for start in range(0, num_sequences, batch_size):
            b = min(batch_size, num_sequences - start)
            input_ids, targets = make_batch(group, b, length, gen)
            correct = _logits(model, input_ids).argmax(-1) == targets
            tok += correct.float().mean(dim=1).sum().item()
            seq += correct.all(dim=1).float().sum().item()
            last += correct[:, -1].float().sum().item()
        out[int(length)] = {
            "token_acc": tok / num_sequences,
            "seq_acc": seq / num_sequences,
            "last_acc": last / num_sequences,
        }
    return out


@torch.no_grad()
def compare_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    group: PermutationGroup,
    lengths: Iterable[int],
    num_sequences: int = 256,
    batch_size: int = 64,
    seed: int = 1234,
) -> dict[int, dict[str, float]]:
    """How a student's predictions relate to its teacher's, per length (same words as ``evaluate``).

    ``agree``: fraction of positions where both predict the same element. Over the positions the teacher gets
    wrong: ``agree_when_teacher_wrong`` (the student copies the error: "inherits") and
    ``right_when_teacher_wrong`` (the student is right: "exceeds"); NaN when the teacher is never wrong.
    """
    student.eval()
    teacher.eval()
    out = {}
    for length in lengths:
        gen = torch.Generator().manual_seed(seed + length)
        same = wrong = copied = fixed = 0.0
        for start in range(0, num_sequences, batch_size):
            b = min(batch_size, num_sequences - start)
            input_ids, targets = make_batch(group, b, length, gen)
            ps, pt = _logits(student, input_ids).argmax(-1), _logits(teacher, input_ids).argmax(-1)
            t_wrong = pt != targets
            same += (ps == pt).float().sum().item()
            wrong += t_wrong.sum().item()
            copied += (t_wrong & (ps == pt)).sum().item()
            fixed += (t_wrong & (ps == targets)).sum().item()
        n = num_sequences * length
        out[int(length)] = {
            "agree": same / n,
            "agree_when_teacher_wrong": copied / wrong if wrong else float("nan"),
            "right_when_teacher_wrong": fixed / wrong if wrong else float("nan"),
            "teacher_wrong": wrong / n,
        }
    return out
