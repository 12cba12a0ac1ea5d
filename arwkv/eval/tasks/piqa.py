"""PIQA (validation): physical commonsense, two solutions; lm-eval prompt "Question: {goal}\nAnswer:".

Reads the original release (valid.jsonl + valid-labels.lst), which is what the harness's HF dataset holds;
llm-foundry's copy strips trailing spaces from some solutions, which changes acc_norm lengths.
"""

from __future__ import annotations

from pathlib import Path

from arwkv.errors import DataError
from arwkv.eval.loglik import LoglikResult
from arwkv.eval.tasks import MC_AGG, Task, multiple_choice, read_jsonl


def load(data_dir: Path) -> list[dict]:
    docs = read_jsonl(data_dir / "piqa" / "valid.jsonl")
    labels = (data_dir / "piqa" / "valid-labels.lst").read_text().split()
    if len(labels) != len(docs):
        raise DataError(f"piqa: {len(docs)} items but {len(labels)} labels in valid-labels.lst")
    return [{**d, "label": int(y)} for d, y in zip(docs, labels, strict=True)]


def requests(doc: dict) -> list[tuple[str, str]]:
    context = f"Question: {doc['goal']}\nAnswer:"
    return [(context, " " + doc["sol1"]), (context, " " + doc["sol2"])]


def process(doc: dict, results: list[LoglikResult]) -> dict[str, float]:
    return multiple_choice([doc["sol1"], doc["sol2"]], doc["label"], results)


TASK = Task("piqa", load, requests, process, aggregation=MC_AGG)
