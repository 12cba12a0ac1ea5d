"""Each task's parsing on real items from ../shared/eval, and the scoring rules."""

from __future__ import annotations

import math

import pytest

from arwkv.eval.loglik import LoglikResult
from arwkv.eval.tasks import TASKS, get_task, multiple_choice


def r(lp: float) -> LoglikResult:
    return LoglikResult(lp, False, 1)


@pytest.fixture
def data(shared):
    return shared / "eval"


def test_sizes_match_the_readme(data):
    sizes = {name: len(get_task(name).load(data)) for name in TASKS}
    assert sizes == {
        "lambada_openai": 5153,
        "arc_easy": 2376,
        "piqa": 1838,
        "hellaswag": 1000,
        "winogrande": 1267,
        "blimp": 4000,
    }


def test_lambada_request(data):
    task = get_task("lambada_openai")
    doc = task.load(data)[0]
    ((ctx, cont),) = task.requests(doc)
    assert ctx.endswith("I don't care about") and cont == " signs"
    assert task.process(doc, [LoglikResult(-2.0, True, 1)]) == {"acc": 1.0, "perplexity": -2.0}


def test_arc_prompt(data):
    task = get_task("arc_easy")
    doc = task.load(data)[1]
    reqs = task.requests(doc)
    assert reqs[0] == (
        "Question: Which piece of safety equipment is used to keep mold spores from entering the "
        "respiratory system?\nAnswer:",
        " safety goggles",
    )
    assert [c for _, c in reqs] == [" safety goggles", " breathing mask", " rubber gloves", " lead apron"]


def test_piqa_reads_original_release_with_labels(data):
    task = get_task("piqa")
    docs = task.load(data)
    assert docs[0]["label"] == 0 and docs[1]["label"] == 1
    reqs = task.requests(docs[1])
    assert reqs[0] == (
        "Question: dresser\nAnswer:",
        " replace drawer with bobby pin ",
    )  # untrimmed, as released


def test_hellaswag_preprocessing(data):
    task = get_task("hellaswag")
    doc = task.load(data)[0]
    assert doc["query"] == (
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your "
        "body. A few women"
    )
    assert doc["gold"] == 3 and len(task.requests(doc)) == 4
    cleaned = [d for d in task.load(data) if "[" in d["query"] or any("[" in c for c in d["choices"])]
    assert cleaned == []  # every WikiHow tag is gone
    from arwkv.eval.tasks.hellaswag import clean

    assert (
        clean(" How to tie a tie [title] Cross the ends. [step] Pull ")
        == "How to tie a tie. Cross the ends. Pull"
    )


def test_winogrande_partial_scoring(data):
    task = get_task("winogrande")
    doc = task.load(data)[0]
    assert task.requests(doc) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert task.process(doc, [r(-5.0), r(-3.0)]) == {"acc": 1.0}  # gold = 1
    assert task.process(doc, [r(-3.0), r(-5.0)]) == {"acc": 0.0}


def test_blimp_pairs(data):
    task = get_task("blimp")
    docs = task.load(data)
    assert len({d["paradigm"] for d in docs[:4]}) == 4  # interleaved, so --limit samples every paradigm
    reqs = task.requests(docs[0])
    # empty context, sentence behind lm-eval's default target_delimiter " " (test_blimp.py pins the tokens)
    assert reqs == [("", " " + docs[0]["sentence_good"]), ("", " " + docs[0]["sentence_bad"])]
    assert task.process(docs[0], [r(-10.0), r(-12.0)]) == {"acc": 1.0}
    assert task.process(docs[0], [r(-12.0), r(-10.0)]) == {"acc": 0.0}


def test_acc_norm_divides_by_characters():
    # raw log-likelihood prefers the short choice; per character the long one wins
    choices = ["no", "a much longer answer"]
    out = multiple_choice(choices, 1, [r(-2.0), r(-4.0)])
    assert out == {"acc": 0.0, "acc_norm": 1.0}
    assert math.isclose(-4.0 / len(choices[1]), -0.2)
    # ties go to the first choice, like numpy argmax
    assert multiple_choice(["ab", "cd"], 0, [r(-1.0), r(-1.0)]) == {"acc": 1.0, "acc_norm": 1.0}
