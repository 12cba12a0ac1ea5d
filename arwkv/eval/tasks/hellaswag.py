"""HellaSwag (1,000-item validation sample): pick the ending of an activity description.

Preprocessing as in lm-eval's hellaswag task: context = activity_label + ": " + ctx_a + " " + ctx_b, with
ctx_b passed through `str.capitalize()` (first letter upper, the rest lower, as the harness does); context
and endings are cleaned of WikiHow markup ("[title]" becomes ". ", other "[...]" tags vanish, double spaces
collapse).
"""

from __future__ import annotations

import re
from pathlib import Path

from arwkv.eval.loglik import LoglikResult
from arwkv.eval.tasks import MC_AGG, Task, multiple_choice, read_jsonl

_TAG = re.compile(r"\[.*?\]")


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return _TAG.sub("", text).replace("  ", " ")


def load(data_dir: Path) -> list[dict]:
    docs = []
    for raw in read_jsonl(data_dir / "hellaswag" / "hellaswag_val_sample1000.jsonl"):
        ctx = raw["ctx_a"] + " " + raw["ctx_b"].capitalize()
        docs.append(
            {
                "query": clean(raw["activity_label"] + ": " + ctx),
                "choices": [clean(e) for e in raw["endings"]],
                "gold": int(raw["label"]),
            }
        )
    return docs


def requests(doc: dict) -> list[tuple[str, str]]:
    return [(doc["query"], " " + c) for c in doc["choices"]]


def process(doc: dict, results: list[LoglikResult]) -> dict[str, float]:
    return multiple_choice(doc["choices"], doc["gold"], results)


TASK = Task("hellaswag", load, requests, process, aggregation=MC_AGG)
