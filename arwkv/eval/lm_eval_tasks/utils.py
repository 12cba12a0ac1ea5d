"""Helpers for the local lm-eval task files (lm-eval loads them through `!function utils.<name>`).

The data is found from this file's location, not the current directory: `$ARWKV_EVAL_DIR` when set, else
`shared/eval` beside the arwkv checkout that holds this folder (`../shared/eval` from the repository root).
Only the standard library and `datasets` (an lm-eval dependency) are imported: lm-eval may run in a
virtualenv without arwkv. `run_lm_eval.py` here checks the files before lm-eval loads any model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV = "ARWKV_EVAL_DIR"
# task -> (split, files under the eval folder); the splits and file order of the original dataset_kwargs
FILES = {
    "lambada_openai_local": ("test", ["lambada_openai/lambada_openai.jsonl"]),
    "arc_easy_local": ("test", ["arc_easy/arc_easy.jsonl"]),
    "piqa_local": ("validation", ["piqa/valid.jsonl", "piqa/valid-labels.lst"]),
    "hellaswag_local": ("validation", ["hellaswag/hellaswag_val_sample1000.jsonl"]),
    "winogrande_local": ("validation", ["winogrande/winogrande.jsonl"]),
    "blimp_local": (
        "test",
        [
            "blimp/anaphor_number_agreement.jsonl",
            "blimp/determiner_noun_agreement_1.jsonl",
            "blimp/irregular_past_participle_verbs.jsonl",
            "blimp/regular_plural_subject_verb_agreement_1.jsonl",
        ],
    ),
}


def eval_dir() -> Path:
    """$ARWKV_EVAL_DIR, else shared/eval next to the arwkv checkout this file belongs to."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[4] / "shared" / "eval"


def missing_files(tasks: list[str] | None = None) -> list[Path]:
    """The files of `tasks` (default: all of them) that are not in `eval_dir()`."""
    root = eval_dir()
    return [root / f for t in (tasks or list(FILES)) for f in FILES[t][1] if not (root / f).is_file()]


def require(tasks: list[str] | None = None) -> Path:
    """`eval_dir()`, or a FileNotFoundError that says where the data was looked for and how to point at it."""
    gone = missing_files(tasks)
    if gone:
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        where = f"${ENV}" if os.environ.get(ENV) else f"the default {eval_dir()} (${ENV} is not set)"
        raise FileNotFoundError(
            f"lm-eval task data not found: {gone[0]}{more}, looked for in {where}. Set {ENV} to the folder "
            "holding lambada_openai/, arc_easy/, piqa/, hellaswag/, winogrande/ and blimp/ (arwkv's "
            "shared/eval)."
        )
    return eval_dir()


def _jsonl(task: str):
    import datasets

    split, files = FILES[task]
    root = require([task])
    return datasets.load_dataset("json", data_files={split: [str(root / f) for f in files]})


def lambada_openai(**kwargs):
    return _jsonl("lambada_openai_local")


def arc_easy(**kwargs):
    return _jsonl("arc_easy_local")


def hellaswag(**kwargs):
    return _jsonl("hellaswag_local")


def winogrande(**kwargs):
    return _jsonl("winogrande_local")


def blimp(**kwargs):
    return _jsonl("blimp_local")


def piqa(**kwargs):
    """PIQA's original release keeps the labels in a separate file, one per line."""
    import datasets

    split, (docs, labels) = FILES["piqa_local"]
    root = require(["piqa_local"])
    data = datasets.load_dataset("json", data_files={split: str(root / docs)})
    gold = (root / labels).read_text().split()
    return data.map(lambda doc, i: {"label": int(gold[i])}, with_indices=True)


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
