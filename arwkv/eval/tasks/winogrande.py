"""WinoGrande (1.1 dev): partial scoring, as lm-eval does it.

The blank is filled with each option to give two contexts; the shared remainder of the sentence (" " + suffix)
is scored under each, and the option whose context makes the suffix likelier wins.
"""

from __future__ import annotations

from pathlib import Path

from arwkv.eval.loglik import LoglikResult
from arwkv.eval.tasks import Task, read_jsonl


def load(data_dir: Path) -> list[dict]:
    return read_jsonl(data_dir / "winogrande" / "winogrande.jsonl")


def requests(doc: dict) -> list[tuple[str, str]]:
    return [(ctx, " " + doc["continuation"]) for ctx in doc["context_options"]]


def process(doc: dict, results: list[LoglikResult]) -> dict[str, float]:
    lls = [r.logprob for r in results]
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    return {"acc": float(best == int(doc["gold"]))}


TASK = Task("winogrande", load, requests, process, aggregation={"acc": "mean"})
