"""Stage 3 by preference — DPO (method.md §5; Rafailov et al. 2023), off by default, after sft.

Each micro-batch holds b pairs as 2b rows (chosen, then rejected; `arwkv.data.preferences`). The policy (the
student) and a frozen reference score the completion tokens only — summed log-probs, shifted once, padding and
prompt never scored — and the loss per pair is −log σ(β·[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)]).
The reference is the student as it enters the stage (a frozen copy, made before the loop restores any
checkpoint, so a resumed run has the same reference) or a named saved student / checkpoint; it is not a
submodule of the task, so it gets no gradient, is not wrapped by DDP and is not saved in checkpoints.

The shared loop does the rest (optimizer, schedule, DDP, checkpoints, exact resume, progress, metrics.jsonl):
per step it logs the pair means of `chosen_reward`, `rejected_reward`, `margin` and `reward_acc`. Held-out
pairs are scored before and after the stage (`<stage>/pairs.json`, beside the usual held-out KL of the run)
and `<stage>/dpo_curves.png` plots the per-step margins and accuracy.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from arwkv.atomic import write_json
from arwkv.config import DPOConfig
from arwkv.data.preferences import PreferenceSet
from arwkv.train.distributed import say
from arwkv.train.forward import Batch, hidden_states
from arwkv.train.loop import LoopResult, train
from arwkv.train.losses import dpo_loss, sequence_logprobs
from arwkv.train.params import param_groups

PAIRS_FILE = "pairs.json"
CURVES_FILE = "dpo_curves.png"


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen copy in eval mode (no dropout), with no gradient."""
    ref = copy.deepcopy(model).eval()
    return ref.requires_grad_(False)


def completion_logprobs(model: nn.Module, batch: Batch, chunk_size: int = 1024) -> Tensor:
    """Summed log-probs of the completion tokens (`loss_mask`) of every row: [rows]."""
    h, head = hidden_states(model, batch)
    return sequence_logprobs(
        h, head, batch["input_ids"], batch["loss_mask"], batch.get("position_ids"), chunk_size
    )


class DPOTask(nn.Module):
    """forward(batch of 2b rows) -> (DPO loss summed over the b pairs, b, reward / margin / accuracy sums)."""

    def __init__(
        self, student: nn.Module, reference: nn.Module, beta: float = 0.1, chunk_size: int = 1024
    ) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "reference", reference)  # frozen, not a submodule
        reference.requires_grad_(False)
        self.beta, self.chunk_size = beta, chunk_size

    def count(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0]) // 2

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        b = self.count(batch)
        policy = completion_logprobs(self.student, batch, self.chunk_size)
        with torch.no_grad():
            ref = completion_logprobs(self.reference, batch, self.chunk_size)
        return dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.beta)


@torch.no_grad()
def pair_metrics(
    policy: nn.Module,
    reference: nn.Module,
    pairs: PreferenceSet,
    beta: float,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Means over `pairs`: DPO loss, rewards, margin, reward accuracy (implicit reward of chosen above
    rejected, ties ½: 0.5 for the reference itself), and `logp_acc`, the reference-free share of pairs whose
    chosen completion the policy finds more likely than the rejected one (ties ½)."""
    device = device or next(policy.parameters()).device
    was = policy.training
    policy.eval()
    sums: dict[str, float] = {}
    n = 0
    try:
        for i in range(0, len(pairs), batch_size):
            batch = {
                k: v.to(device) for k, v in pairs.batch(range(i, min(i + batch_size, len(pairs)))).items()
            }
            b = batch["input_ids"].shape[0] // 2
            lp = completion_logprobs(policy, batch)
            lr = completion_logprobs(reference, batch)
            loss, _, extras = dpo_loss(lp[:b], lp[b:], lr[:b], lr[b:], beta)
            d = lp[:b] - lp[b:]
            parts = {
                "loss": loss,
                **extras,
                "logp_acc": ((d > 0).float() + 0.5 * (d == 0).float()).sum(),
                "chosen_logp": lp[:b].sum(),
                "rejected_logp": lp[b:].sum(),
            }
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += b
    finally:
        policy.train(was)
    return {k: v / max(n, 1) for k, v in sums.items()} | {"pairs": float(n)}


def run_dpo(
    student: nn.Module,
    reference: nn.Module,
    data,
    cfg: DPOConfig,
    run_dir: str | Path,
    heldout: PreferenceSet | None = None,
    **loop_kwargs: Any,
) -> LoopResult:
    """Train `student` by DPO against `reference` on the pair loader `data` (a PackedLoader over a
    PreferenceSet). With `heldout`, pair metrics before/after go to `<run_dir>/pairs.json`, and the loop's
    periodic evaluations include them (`eval/pairs_*`)."""
    run_dir = Path(run_dir)
    env = loop_kwargs.get("env")
    device = env.device if env is not None else next(student.parameters()).device
    reference.to(device)
    groups = param_groups(student, cfg.lr, cfg.mixer_lr, freeze=cfg.freeze)
    task = DPOTask(student, reference, cfg.beta, cfg.chunk_size)
    is_main = env is None or env.is_main
    record: dict[str, Any] = {}
    path = run_dir / PAIRS_FILE
    if heldout is not None:
        # the entering student is the reference: its reward accuracy is 0.5 by definition, logp_acc is not
        record = json.loads(path.read_text()) if path.is_file() else {}
        if "before" not in record:
            record = {"beta": cfg.beta, "heldout_pairs": len(heldout)}
            record["before"] = pair_metrics(student, reference, heldout, cfg.beta, device=device)
            if is_main:
                write_json(path, record)
        base_eval = loop_kwargs.pop("eval_fn", None)

        def eval_fn(t: nn.Module) -> dict[str, float]:
            out = base_eval(t) if base_eval is not None else {}
            pm = pair_metrics(t.student, reference, heldout, cfg.beta, device=device)
            return {**out, **{f"pairs_{k}": v for k, v in pm.items()}}

        loop_kwargs["eval_fn"] = eval_fn
    res = train(task, data, cfg, run_dir, param_groups=groups, desc="dpo", **loop_kwargs)
    if heldout is not None:
        record["after"] = pair_metrics(student, reference, heldout, cfg.beta, device=device)
        if hasattr(data, "corpus"):
            record["train_pairs"] = len(data.corpus)
        if is_main:
            write_json(path, record)
    if is_main:
        plot_dpo(run_dir)
    return res


# ------------------------------------------------------------------------------------------------ wiring


def prepare_pairs(cfg, teacher, student, tokenizer, env) -> tuple[PreferenceSet, PreferenceSet | None]:
    """(training pairs, held-out pairs): from `dpo.data` files, or the data-free set (made by rank 0, cached,
    then read by every process)."""
    from arwkv.data.packing import teacher_vocab_size
    from arwkv.data.preferences import data_free_preferences, load_preferences
    from arwkv.loading import pad_token_id
    from arwkv.recipes.run_data import cache_dir_for
    from arwkv.train.distributed import barrier

    d = cfg.dpo
    if d.data:
        pairs = load_preferences(
            d.data, tokenizer, d.seq_len, pad_id=pad_token_id(tokenizer), vocab=teacher_vocab_size(teacher)
        )
        if d.heldout_pairs == 0:
            return pairs, None
        return pairs.split(d.heldout_pairs, seed=cfg.seed)
    f = d.data_free
    cache = Path(f.cache_dir) if f.cache_dir else cache_dir_for(cfg, "preferences")

    def make(progress: bool):
        return data_free_preferences(
            teacher,
            student,
            tokenizer,
            num_pairs=f.num_pairs,
            num_heldout=d.heldout_pairs,
            mode=f.prompts,
            prompt_min=f.prompt_min,
            prompt_max=f.prompt_max,
            reply_len=f.reply_len,
            teacher_temperature=f.teacher_temperature,
            batch_size=f.batch_size,
            seed=cfg.seed,
            cache_dir=cache,
            progress=progress,
        )

    made = make(progress=True) if env.is_main else None
    barrier()
    train_pairs, held = made if made is not None else make(progress=False)  # the others read the cache
    where = "data-free preference pair"
    return train_pairs.fit(d.seq_len, where), held.fit(d.seq_len, where) if held is not None else None


def run_dpo_stage(cfg, student, teacher, tokenizer, stage_dir: Path, **kw: Any) -> LoopResult:
    """`arwkv dpo` / the recipe's `dpo:` stage inside `arwkv.recipes.convert.run` (`kw`: the loop's
    arguments, `env` among them)."""
    from arwkv.data.packing import PackedLoader
    from arwkv.recipes.students import load_student
    from arwkv.train.loop import micro_batch_size

    d: DPOConfig = cfg.dpo
    env = kw["env"]
    # the reference first: the student as it enters the stage (the loop restores a checkpoint only later)
    if d.reference:
        reference = load_student(d.reference, cfg, teacher).eval().requires_grad_(False)
    else:
        reference = frozen_reference(student)
    train_pairs, held = prepare_pairs(cfg, teacher, student, tokenizer, env)
    meta = train_pairs.meta
    say(
        env,
        f"dpo: {len(train_pairs)} training pairs"
        + (f", {len(held)} held-out" if held is not None else "")
        + (
            f" ({meta['dropped_identical']} prompts dropped: same reply)"
            if "dropped_identical" in meta
            else ""
        )
        + f", β {d.beta:g}, reference {'the entering student' if not d.reference else d.reference}",
    )
    loader = PackedLoader(
        train_pairs,
        micro_batch_size(d, env.world_size),
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        rank=env.rank,
        world_size=env.world_size,
    )
    return run_dpo(student, reference, loader, d, stage_dir, heldout=held, **kw)


# ------------------------------------------------------------------------------------------------ report


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def plot_dpo(stage_dir: str | Path) -> Path | None:
    """`dpo_curves.png`: per-step loss, chosen / rejected rewards and margin, reward accuracy (training
    batches, and held-out pairs where evaluated)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stage_dir = Path(stage_dir)
    recs = _records(stage_dir / "metrics.jsonl")
    steps = [r for r in recs if "margin" in r]
    if not steps:
        return None
    evals = [r for r in recs if "eval/pairs_reward_acc" in r]
    pairs = json.loads((stage_dir / PAIRS_FILE).read_text()) if (stage_dir / PAIRS_FILE).is_file() else {}
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.4))
    axes[0].plot(x, [r["loss"] for r in steps])
    axes[0].axhline(0.6931, color="gray", ls=":", lw=0.8, label="log 2 (policy = reference)")
    axes[0].set_title("DPO loss (train batches)")
    ax = axes[1]
    ax.plot(x, [r["chosen_reward"] for r in steps], label="chosen  β·log π/π_ref")
    ax.plot(x, [r["rejected_reward"] for r in steps], label="rejected β·log π/π_ref")
    ax.plot(x, [r["margin"] for r in steps], label="margin", color="black")
    ax.axhline(0, color="gray", lw=0.6)
    ax.set_title("implicit rewards (train batches)")
    ax = axes[2]
    ax.plot(x, [r["reward_acc"] for r in steps], label="train batches", alpha=0.7)
    if evals or pairs.get("after"):
        pts = [(0, pairs["before"]["reward_acc"])] if pairs.get("before") else []
        pts += [(r["step"], r["eval/pairs_reward_acc"]) for r in evals]
        if pairs.get("after"):
            pts.append((x[-1], pairs["after"]["reward_acc"]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="held-out pairs")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("reward accuracy")
    for a in axes:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    out = stage_dir / CURVES_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report_lines(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """The DPO section of report.md (empty when the run has no finished dpo stage)."""
    st = summary.get("stages", {}).get("dpo")
    if not st or not st.get("done"):
        return []
    pairs = st.get("pairs") or {}
    lines = ["", "## DPO", ""]
    before, after = pairs.get("before"), pairs.get("after")
    if before and after:
        lines += [
            f"{int(before['pairs'])} held-out pairs, β {pairs.get('beta')}; reward accuracy is 0.5 for the "
            "reference itself (ties count ½); log-p accuracy: the share of pairs whose chosen completion the "
            "model finds more likely (no reference).",
            "",
            "| student | DPO loss | reward acc. | margin | log-p acc. | held-out KL | NLL ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m, h in (
            ("entering", before, st.get("before", {})),
            ("after dpo", after, st.get("after", {})),
        ):
            lines.append(
                f"| {name} | {m['loss']:.4f} | {m['reward_acc']:.3f} | {m['margin']:.4f} | "
                f"{m['logp_acc']:.3f}"
                f" | {h.get('kl', float('nan')):.4f} | {h.get('nll_ratio', float('nan')):.4f} |"
            )
    if (run_dir / "dpo" / CURVES_FILE).is_file():
        lines += ["", f"![dpo curves](dpo/{CURVES_FILE})"]
    return lines
