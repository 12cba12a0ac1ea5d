"""BLiMP minimal pairs (the four paradigms in ../shared/eval/blimp): acc = P(good sentence) > P(bad sentence).

lm-eval's blimp_* tasks (lm_eval/tasks/blimp/_template_yaml) are multiple_choice with an empty
`doc_to_text` and the default `target_delimiter` " ", so each request is ("", " " + sentence): the sentence,
with its leading space, scored after the prefix token (BOS, else EOS) that stands in for the empty context.
The space matters: BPE tokenizers encode " The" and "The" as different tokens. acc = argmax over [good, bad]
== 0, so a tie counts as correct. The group averages paradigms; all four here have 1,000 pairs, so the mean
over pairs equals the mean of paradigms.
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

from arwkv.errors import DataError
from arwkv.eval.loglik import LoglikResult
from arwkv.eval.tasks import Task, read_jsonl


def load(data_dir: Path) -> list[dict]:
    files = sorted((data_dir / "blimp").glob("*.jsonl"))
    if not files:
        raise DataError(f"no BLiMP paradigms (*.jsonl) under {data_dir / 'blimp'}")
    # Interleave paradigms so that `limit` samples all of them.
    per_file = [[{**d, "paradigm": f.stem} for d in read_jsonl(f)] for f in files]
    return [doc for group in zip_longest(*per_file) for doc in group if doc is not None]


# lm-eval's default target_delimiter, put in front of every choice of a multiple_choice task.
DELIMITER = " "


def requests(doc: dict) -> list[tuple[str, str]]:
    return [("", DELIMITER + doc["sentence_good"]), ("", DELIMITER + doc["sentence_bad"])]


def process(doc: dict, results: list[LoglikResult]) -> dict[str, float]:
    good, bad = (r.logprob for r in results)
    return {"acc": float(good >= bad)}


TASK = Task("blimp", load, requests, process, aggregation={"acc": "mean"})
