from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from arwkv.eval.harness import default_data_dir, load_models, run_eval

from .tiny import tiny_llama


@pytest.fixture
def model_dir(tmp_path, qwen_tokenizer):
    model = tiny_llama(vocab_size=len(qwen_tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    path = tmp_path / "tiny-teacher"
    model.save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return path


def test_run_eval_writes_report_for_teacher_and_baseline(model_dir, shared, tmp_path):
    out = tmp_path / "eval"
    result = run_eval(
        [str(model_dir), f"swa:{model_dir}"],
        ["arc_easy", "blimp"],
        limit=3,
        out_dir=out,
        data_dir=shared / "eval",
        progress=False,
    )
    assert list(result["results"]) == ["tiny-teacher", "swa64+4(tiny-teacher)"]
    assert result["reference"] == "tiny-teacher"
    teacher, swa = result["results"].values()
    assert teacher["arc_easy"]["acc"]["n"] == 3 and teacher["blimp"]["acc"]["n"] == 3
    # every prompt here is shorter than the 64-token window, so the baseline is exactly the teacher
    for task in ("arc_easy", "blimp"):
        for metric, score in teacher[task].items():
            assert math.isclose(swa[task][metric]["value"], score["value"])
    saved = json.loads((out / "eval.json").read_text())
    for value in saved["retention"]["swa64+4(tiny-teacher)"].values():
        assert math.isnan(value) or math.isclose(value, 100.0)  # NaN where the teacher scored 0
    assert "| arc_easy | acc |" in (out / "eval.md").read_text()
    # an absolute data folder is reported relative to the working directory: no machine paths in reports
    assert not Path(saved["config"]["data_dir"]).is_absolute()


def test_baseline_shares_the_teachers_weights(model_dir):
    models = load_models([str(model_dir), f"swa:{model_dir}"], names=["t", "b"])
    (teacher, tok_t), (baseline, tok_b) = models["t"], models["b"]
    assert baseline.teacher is teacher and tok_b is tok_t


def test_data_dir_default_and_override(monkeypatch, tmp_path):
    assert default_data_dir().parts[-2:] == ("shared", "eval")
    monkeypatch.setenv("ARWKV_EVAL_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path


def test_cli_eval_runs_passkey_alone(model_dir, tmp_path, capsys):
    from arwkv.cli import main

    out = tmp_path / "lc"
    code = main(
        [
            "eval",
            f"t={model_dir}",
            f"w=swa:{model_dir}",
            "--tasks",
            "none",
            "--passkey",
            "128,256",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = (out / "long_context.md").read_text()
    assert "passkey@128" in table and "passkey@256" in table and "| w |" in table
    data = json.loads((out / "long_context.json").read_text())
    assert set(data) == {"t", "w"} and not (out / "eval.md").exists()
    assert main(["eval", str(model_dir), "--passkey", "1k", "--out", str(out)]) == 2
    assert "--passkey" in capsys.readouterr().err


def test_cli_eval_bf16_scores_close_to_fp32(model_dir, tmp_path, shared):
    from arwkv.cli import main

    scores = {}
    for flag in ([], ["--bf16"]):
        out = tmp_path / ("bf16" if flag else "fp32")
        args = ["eval", f"m={model_dir}", "--tasks", "wikitext", "--limit", "2", "--out", str(out), *flag]
        assert main(args) == 0
        data = json.loads((out / "eval.json").read_text())
        scores[bool(flag)] = data["results"]["m"]["wikitext"]["perplexity"]["value"]
    assert scores[True] != scores[False]  # autocast really ran
    assert abs(scores[True] / scores[False] - 1) < 0.05
