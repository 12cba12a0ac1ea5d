"""LAMBADA (OpenAI detokenized test set): predict the last word of a passage.

lm-eval's `lambada_openai` splits `text` at the last space: context = all but the last word, continuation =
" " + last word. The local file stores that split already (context without trailing space, bare word).
acc = greedy decoding reproduces every token of the word; perplexity = exp(-mean log-likelihood of the word).
"""

from __future__ import annotations

from pathlib import Path

from arwkv.eval.loglik import LoglikResult
from arwkv.eval.tasks import Task, read_jsonl


def load(data_dir: Path) -> list[dict]:
    return read_jsonl(data_dir / "lambada_openai" / "lambada_openai.jsonl")


def requests(doc: dict) -> list[tuple[str, str]]:
    return [(doc["context"], " " + doc["continuation"])]


def process(doc: dict, results: list[LoglikResult]) -> dict[str, float]:
    (r,) = results
    return {"acc": float(r.is_greedy), "perplexity": r.logprob}


TASK = Task(
    "lambada_openai",
    load,
    requests,
    process,
    aggregation={"acc": "mean", "perplexity": "perplexity"},
    higher_is_better={"acc": True, "perplexity": False},
)
