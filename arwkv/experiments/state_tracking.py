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
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arwkv.ops.divergence import kl_per_token
from arwkv.train.loop import train as train_loop

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
    "WordBatches",
    "RunningProductTask",
    "WordDistillTask",
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
    """One training or distillation run of the experiment. The project's training loop runs it: AdamW
    (betas 0.9/0.98, no weight decay on vectors), linear warm-up for `warmup` steps then cosine decay to 10%
    of `lr`, gradients clipped to `grad_clip`, a checkpoint every `checkpoint_every` steps in its run folder.
    """

    steps: int = 2000
    batch_size: int = 64
    length: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 250


@dataclass
class _LoopSettings:
    """`TrainConfig` as the settings `arwkv.train.loop.train` reads (`LoopSettings`)."""

    tokens: int
    max_steps: int
    seq_len: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    clip: float
    weight_decay: float
    log_interval: int
    ckpt_interval: int
    grad_accum: int = 1
    schedule: str = "cosine"
    betas: tuple[float, float] = (0.9, 0.98)
    eval_interval: int = 0
    keep_checkpoints: int = 1

    @classmethod
    def of(cls, cfg: TrainConfig) -> _LoopSettings:
        return cls(
            tokens=cfg.steps * cfg.batch_size * (cfg.length + 1),
            max_steps=cfg.steps,
            seq_len=cfg.length + 1,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            min_lr=0.1 * cfg.lr,
            warmup_steps=cfg.warmup,
            clip=cfg.grad_clip,
            weight_decay=cfg.weight_decay,
            log_interval=cfg.log_every,
            ckpt_interval=cfg.checkpoint_every,
        )


class WordBatches:
    """Endless batches of random words with their running products, from one seeded generator whose state is
    the stream's position (saved in the loop's checkpoints, so a resumed run draws the same words)."""

    def __init__(self, group: PermutationGroup, batch_size: int, length: int, seed: int) -> None:
        self.group, self.batch_size, self.length = group, batch_size, length
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> WordBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        input_ids, targets = make_batch(self.group, self.batch_size, self.length, self.generator)
        return {"input_ids": input_ids, "targets": targets}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Scored logits ``[B, T, |G|]``: drop the BOS position and the BOS column of the vocabulary."""
    return model(input_ids=input_ids).logits[:, 1:, :-1]


class RunningProductTask(nn.Module):
    """The loop's task for training from scratch: cross-entropy of the running product at every position.
    forward(batch) -> (CE sum, positions, {"token_acc": positions right})."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.student = model

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["targets"].numel()

    def forward(self, batch: dict[str, torch.Tensor]):
        logits = _logits(self.student, batch["input_ids"])
        targets = batch["targets"]
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        )
        right = (logits.argmax(-1) == targets).sum().float()
        return ce, targets.numel(), {"token_acc": right}


class WordDistillTask(RunningProductTask):
    """The loop's task for distillation: T²·KL(teacher ‖ student) on the logits (the project's one KL,
    `arwkv.ops.divergence.kl_per_token`) at every position, no labels; targets only score accuracy."""

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0) -> None:
        super().__init__(student)
        object.__setattr__(
            self, "teacher", teacher
        )  # frozen, not a submodule (not trained, not checkpointed)
        teacher.eval().requires_grad_(False)
        self.temperature = temperature

    def forward(self, batch: dict[str, torch.Tensor]):
        with torch.no_grad():
            teacher_logits = _logits(self.teacher, batch["input_ids"])
        logits = _logits(self.student, batch["input_ids"])
        kl = kl_per_token(logits, teacher_logits, self.temperature).sum()
        right = (logits.argmax(-1) == batch["targets"]).sum().float()
        return kl, batch["targets"].numel(), {"token_acc": right}


def _fit(
    task: RunningProductTask,
    group: PermutationGroup,
    cfg: TrainConfig,
    run_dir: str | Path,
    on_log: Callable[[dict], None] | None,
    desc: str,
) -> list[dict]:
    model = task.student
    # no weight decay on vectors (norms, decay/bonus parameters): decaying them toward 0 changes their meaning
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "lr": cfg.lr, "name": "matrices"},
        {
            "params": [p for p in trainable if p.dim() < 2],
            "lr": cfg.lr,
            "name": "vectors",
            "weight_decay": 0.0,
        },
    ]
    logged = (
        (lambda step, rec: on_log(rec) if step % cfg.log_every == 0 or step == cfg.steps else None)
        if on_log
        else None
    )
    train_loop(
        task,
        WordBatches(group, cfg.batch_size, cfg.length, cfg.seed),
        _LoopSettings.of(cfg),
        run_dir,
        param_groups=groups,
        desc=desc,
        on_step=logged,
    )
    model.eval()
    return _history(Path(run_dir))


def _history(run_dir: Path) -> list[dict]:
    """The run's logged training records (all sittings), from its metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def train(
    model: nn.Module,
    group: PermutationGroup,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train from scratch on the word problem (mean token cross-entropy at every position) in `run_dir`,
    resuming its checkpoints. Returns the logged records ({"step", "loss", "token_acc", "lr/…", …}) of every
    sitting, every `log_every` steps."""
    return _fit(RunningProductTask(model), group, cfg, run_dir, on_log, "train")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    group: PermutationGroup,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    temperature: float = 1.0,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Distil ``teacher`` into ``student`` on task inputs: KL(teacher ‖ student) on the logits, no labels.

    Targets are only used to report accuracy, so the student can learn no more than the teacher shows it at
    the training length; what it does beyond that length is the question. Resumes `run_dir` like `train`.
    """
    return _fit(WordDistillTask(student, teacher, temperature), group, cfg, run_dir, on_log, "distill")


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
