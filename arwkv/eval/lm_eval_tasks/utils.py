"""Helpers for the local lm-eval task files (loaded by lm-eval through `!function utils.<name>`)."""

from __future__ import annotations

import re
from pathlib import Path


def piqa_labels(dataset):
    labels = Path("../shared/eval/piqa/valid-labels.lst").read_text().split()
    return dataset.map(lambda doc, i: {"label": int(labels[i])}, with_indices=True)


def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean(doc["activity_label"] + ": " + ctx),
            "choices": [_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


def winogrande_gold(doc) -> int:
    return int(doc["gold"])


def winogrande_target(doc) -> str:
    return doc["continuation"]


def winogrande_contexts(doc) -> list[str]:
    return list(doc["context_options"])
