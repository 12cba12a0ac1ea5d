"""ARC-Easy (test): four-way science questions, lm-eval prompt "Question: {q}\nAnswer:" + " {choice}"."""

from __future__ import annotations

from pathlib import Path

from arwkv.eval.loglik import LoglikResult
from arwkv.eval.tasks import MC_AGG, Task, multiple_choice, read_jsonl


def load(data_dir: Path) -> list[dict]:
    # llm-foundry rows: {"query": "Question: ...", "choices", "gold"}; the harness appends "\nAnswer:".
    return read_jsonl(data_dir / "arc_easy" / "arc_easy.jsonl")


def requests(doc: dict) -> list[tuple[str, str]]:
    context = doc["query"] + "\nAnswer:"
    return [(context, " " + c) for c in doc["choices"]]


def process(doc: dict, results: list[LoglikResult]) -> dict[str, float]:
    return multiple_choice(doc["choices"], int(doc["gold"]), results)


TASK = Task("arc_easy", load, requests, process, aggregation=MC_AGG)
