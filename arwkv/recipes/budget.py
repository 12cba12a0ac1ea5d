"""A wall-clock budget for a conversion: `budget.minutes=120` turns into token budgets per stage.

How a user plans is "convert for two hours". With `budget.minutes > 0` each enabled stage gets a share of
the training minutes (`budget.align_share`, `budget.sft_share`, the rest to stage 2); each stage's
throughput is measured on this machine with two forward/backward passes of its own task on its own data (no
optimizer step, gradients discarded), and `tokens = share x minutes x tokens/s`. The plan is written to
`<run>/budget.json` and reused on resume, so a resumed run trains exactly the steps it planned. Data
preparation and held-out evaluations are not in the budget (they are reported separately).

Extending: rerunning with a larger `budget.minutes` on the same out_dir keeps the stages that already ran at
their token budgets and gives the extra minutes to the last stage at its measured rate; a finished last stage
is reopened and continues from its checkpoint (its cosine schedule stretches to the new length). A smaller
budget than the plan's is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from arwkv.atomic import write_json
from arwkv.config import RecipeConfig, StageConfig
from arwkv.errors import ConfigError
from arwkv.recipes.run_data import RunData, open_teacher_cache
from arwkv.train import checkpoint as ckpt
from arwkv.train.distributed import DistEnv, barrier, say
from arwkv.train.loop import micro_batch_size

PLAN_FILE = "budget.json"


def stage_shares(stages: list[str], align_share: float, sft_share: float) -> dict[str, float]:
    """Fractions of the budget per enabled stage; stage 2 (or the last stage) takes what is left."""
    shares = {"align": align_share, "sft": sft_share}
    out = {s: shares.get(s, 0.0) for s in stages}
    rest = [s for s in stages if s not in shares]
    left = 1.0 - sum(out.values())
    if left < 0 or (rest and left <= 0):
        raise ConfigError(
            f"budget shares add up to more than 1 (align_share {align_share}, sft_share {sft_share}); "
            "lower them so stage 2 keeps a share"
        )
    for s in rest:
        out[s] = left / len(rest)
    if not rest and stages:  # no stage 2: the last stage takes the remainder
        out[stages[-1]] += left
    return out


def plan_tokens(
    run_dir: Path,
    minutes: float,
    stages: list[str],
    shares: dict[str, float],
    measure: Callable[[str], float],
    finished: set[str],
) -> dict[str, Any]:
    """The token budget per stage for `minutes` of training; `measure(stage)` returns tokens/s.

    Returns the plan ({"minutes", "rates", "tokens", "reopened"}), written atomically to budget.json.
    """
    path = run_dir / PLAN_FILE
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and set(old["tokens"]) != set(stages):
        old = None  # other stages than planned: plan again
    if old is not None and abs(old["minutes"] - minutes) < 1e-9:
        return {**old, "reopened": []}
    if old is not None and minutes < old["minutes"]:
        raise ConfigError(
            f"budget.minutes={minutes:g} is less than the {old['minutes']:g} this run was planned with "
            f"({path}); a budget can only be extended — use another out_dir to plan a shorter run"
        )
    if old is None:
        rates = {s: measure(s) for s in stages}
        tokens = {s: max(1, int(shares[s] * minutes * 60 * rates[s])) for s in stages}
        plan = {"minutes": minutes, "rates": rates, "tokens": tokens, "shares": shares}
        reopened: list[str] = []
    else:
        last = stages[-1]
        tokens = dict(old["tokens"])
        tokens[last] += int((minutes - old["minutes"]) * 60 * old["rates"][last])
        plan = {**old, "minutes": minutes, "tokens": tokens}
        reopened = [last] if last in finished else []
    write_json(path, plan)
    return {**plan, "reopened": reopened}


def measure_rate(step: Callable[[], int], repeats: int = 2) -> float:
    """Tokens/s of `step()` (which returns its token count), timing all but the first (warm-up) call."""
    step()
    t0, n = time.perf_counter(), 0
    for _ in range(max(1, repeats - 1)):
        n += step()
    return n / max(time.perf_counter() - t0, 1e-9)


def apply_budget(cfg, stages, summary, student, teacher, distill_teacher, data, env: DistEnv) -> None:
    """Set each stage's `tokens` from `budget.minutes` (plan measured once, kept in budget.json)."""
    finished = {s for s in stages if summary["stages"].get(s, {}).get("done")}
    shares = stage_shares(stages, cfg.budget.align_share, cfg.budget.sft_share)
    if env.is_main:
        measure = lambda s: _stage_rate(s, student, teacher, distill_teacher, data, cfg, env)  # noqa: E731
        plan = plan_tokens(cfg.run_dir, cfg.budget.minutes, stages, shares, measure, finished)
    barrier()
    if not env.is_main:
        plan = {**json.loads((cfg.run_dir / PLAN_FILE).read_text()), "reopened": []}
        plan["reopened"] = [s for s in stages if s in finished and not _stage_complete(cfg, s, plan)]
    for s, n in plan["tokens"].items():
        getattr(cfg, s).tokens = int(n)
    for s in plan["reopened"]:
        summary["stages"][s]["done"] = False  # resumes from its checkpoint with the longer budget
    summary["budget"] = {k: v for k, v in plan.items() if k != "reopened"}
    say(
        env,
        f"budget {cfg.budget.minutes:g} min: "
        + ", ".join(f"{s} {plan['tokens'][s]:,} tokens at {plan['rates'][s]:.0f} tok/s" for s in stages)
        + (f" (extended: {', '.join(plan['reopened'])} continues)" if plan["reopened"] else ""),
    )


def _stage_complete(cfg: RecipeConfig, stage: str, plan: dict) -> bool:
    """A finished stage whose last checkpoint already holds the planned tokens."""
    last = ckpt.latest_intact_checkpoint(cfg.run_dir / stage / "checkpoints", warn=False)
    if last is None:
        return False
    state = json.loads((last / "trainer_state.json").read_text())
    return int(state.get("tokens", 0)) >= int(plan["tokens"][stage])


def _stage_rate(name: str, student, teacher, distill_teacher, data: RunData, cfg: RecipeConfig, env) -> float:
    """Tokens/s of one stage's forward + backward on its own rows (two micro-batches; gradients dropped)."""
    from arwkv.data.packing import PackedLoader
    from arwkv.recipes.align import AlignTask
    from arwkv.recipes.distill import DistillTask
    from arwkv.recipes.sft import SFTTask
    from arwkv.train.params import param_groups

    scfg: StageConfig = getattr(cfg, name)
    rows = data.rows(name, scfg.seq_len)
    cached = name == "distill" and scfg.teacher_topk > 0
    # another seed than training, so the rows the probe puts into the teacher cache are a random few
    loader = PackedLoader(
        rows, micro_batch_size(scfg, env.world_size), seed=cfg.seed + 7919, with_row_ids=cached
    )
    if name == "align":
        param_groups(student, scfg.lr, only=["mixers"])
        task = AlignTask(student, teacher, loss=scfg.loss)
    elif name == "distill":
        param_groups(student, scfg.lr, freeze=scfg.freeze)
        cache = (
            open_teacher_cache(cfg, distill_teacher, data.tokenizer, rows, env.rank, corpus=data.corpus)
            if cached
            else None
        )
        task = DistillTask(student, distill_teacher, scfg.kl_temperature, scfg.ce_weight, cache=cache)
    else:
        param_groups(student, scfg.lr, freeze=scfg.freeze)
        task = SFTTask(student, scfg.chunk_size)

    def step() -> int:
        batch = {k: v.to(env.device) for k, v in next(loader).items()}
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, _, _ = task(batch)
        loss.float().backward()
        student.zero_grad(set_to_none=True)
        return int(batch["input_ids"].numel())

    say(env, f"budget: measuring {name} throughput")
    rng = ckpt.rng_state()
    try:
        return measure_rate(step) * env.world_size  # processes run side by side
    finally:
        ckpt.set_rng_state(rng)  # the probe must not shift the training run's randomness
