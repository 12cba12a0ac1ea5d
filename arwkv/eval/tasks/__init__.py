"""Zero-shot tasks with lm-evaluation-harness conventions, one file each; `get_task(name)` returns one."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from arwkv.errors import DataError
from arwkv.eval.loglik import LoglikResult

TASKS = ("lambada_openai", "arc_easy", "piqa", "hellaswag", "winogrande", "blimp")


@dataclass(frozen=True)
class Task:
    """A task turns documents into loglikelihood requests and per-document metric values.

    `aggregation[metric]` is "mean" (accuracy-like, binomial stderr) or "perplexity" (the per-document values
    are continuation log-likelihoods; the score is exp(-mean), as lm-eval aggregates `perplexity`).
    """

    name: str
    load: Callable[[Path], list[dict]]
    requests: Callable[[dict], list[tuple[str, str]]]
    process: Callable[[dict, list[LoglikResult]], dict[str, float]]
    aggregation: dict[str, str]
    higher_is_better: dict[str, bool] = field(default_factory=dict)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    module = importlib.import_module(f"arwkv.eval.tasks.{name}")
    return module.TASK


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(
            f"evaluation file {path} is missing; point ARWKV_EVAL_DIR (or data_dir) at "
            "the folder holding the sets (../shared/eval)"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def multiple_choice(choices: list[str], gold: int, results: list[LoglikResult]) -> dict[str, float]:
    """acc: argmax log-likelihood; acc_norm: argmax log-likelihood per character of the choice.

    lm-eval normalises by `len(choice)` without the " " target delimiter; ties go to the first choice
    (numpy argmax), so Python's max over indices with `>` keeps the same order.
    """
    lls = [r.logprob for r in results]
    norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    best_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return {"acc": float(best == gold), "acc_norm": float(best_norm == gold)}


MC_AGG = {"acc": "mean", "acc_norm": "mean"}
