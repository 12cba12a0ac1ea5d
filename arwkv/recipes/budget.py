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

from arwkv.atomic import write_json
from arwkv.errors import ConfigError

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
