"""`arwkv demo` end to end on a tiny chat teacher: convert, benchmarks, long context, chat, demo.md."""

from __future__ import annotations

import json

import pytest

from arwkv.cli import main
from arwkv.eval.harness import load_models
from arwkv.recipes.demo import chat_reply

pytestmark = pytest.mark.slow


def test_demo_converts_evaluates_and_both_models_answer(qwen_tok_teacher, tmp_path, capsys, monkeypatch):
    import arwkv.recipes.demo as demo

    # small sets and contexts for the tiny teacher; the CLI path is otherwise the one `make demo` runs
    run_demo = demo.run_demo
    monkeypatch.setattr(
        demo,
        "run_demo",
        lambda cfg, **kw: run_demo(cfg, tasks=("arc_easy", "wikitext"), passkey_lengths=(256,), **kw),
    )
    run = tmp_path / "run"
    code = main(
        [
            "demo",
            f"teacher.path={qwen_tok_teacher}",
            f"out_dir={run}",
            "threads=1",
            "data.data_free.num_sequences=8",
            "data.data_free.seq_len=64",
            "data.data_free.batch_size=8",
            "data.heldout.num_sequences=4",
            "data.heldout.seq_len=64",
            "data.heldout.batch_size=4",
            "align.seq_len=64",
            "align.max_steps=2",
            "distill.seq_len=64",
            "distill.max_steps=2",
            "--limit",
            "3",
            "--prompt",
            "Name a colour.",
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0
    report = (run / "demo.md").read_text()
    # the benchmark table has all three models, with real scores
    scores = json.loads((run / "eval" / "eval.json").read_text())
    assert set(scores["results"]) == {"teacher", "student", "swa"}
    for per_task in scores["results"].values():
        assert per_task["arc_easy"]["acc"]["n"] == 3 and per_task["wikitext"]["perplexity"]["value"] > 1
    assert (run / "eval" / "long_context.png").is_file() and "passkey@256" in report
    # the answers in the report are the models' own greedy replies
    models = load_models([str(qwen_tok_teacher), str(run / "final")], names=["teacher", "student"])
    for name, (model, tok) in models.items():
        reply = chat_reply(model, tok, "Name a colour.", max_new_tokens=8)
        assert f"**{name}**:\n\n```text\n{reply or '(empty)'}\n```" in report
    assert "Name a colour." in report and "report.md" in report
    assert "What a longer conversion reaches" in report and "smollm2-135m-long" in report
