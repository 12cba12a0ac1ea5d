"""End to end: `arwkv convert` on stories260K with a few steps, exact resume after Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arwkv.cli import main
from arwkv.config import load_recipe
from arwkv.errors import DataError
from arwkv.recipes import convert as convert_mod
from arwkv.train.loop import TrainingInterrupted

TINY = [
    "processes=1",
    "data.data_free.num_sequences=48",
    "data.data_free.seq_len=64",
    "data.data_free.batch_size=48",
    "data.heldout.num_sequences=8",
    "data.heldout.seq_len=64",
    "data.heldout.batch_size=8",
    "align.seq_len=64",
    "align.batch_size=8",
    "align.max_steps=3",
    "align.warmup_steps=1",
    "distill.seq_len=64",
    "distill.batch_size=8",
    "distill.max_steps=4",
    "distill.warmup_steps=1",
    "distill.eval_interval=2",
    "distill.ckpt_interval=1",
    "distill.log_interval=1",
    "threads=1",
]


def _teacher(shared: Path) -> str:
    return f"teacher.path={shared / 'assets/llama2c-stories260K/stories260K.bin'}"


@pytest.mark.slow
def test_convert_stories260k_end_to_end(shared, tmp_path, capsys):
    run = tmp_path / "st"
    args = ["convert", "--recipe", "stories260k", _teacher(shared), f"out_dir={run}", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert str(run / "final") in out
    # the student is a native HF checkpoint
    from transformers import AutoModelForCausalLM

    import arwkv.models.arwkv  # noqa: F401

    student = AutoModelForCausalLM.from_pretrained(run / "final")
    assert student.config.model_type == "arwkv" and student.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[1, 5, 9]])).logits).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["align"]["done"] and summary["stages"]["distill"]["done"]
    assert summary["stages"]["distill"]["steps"] == 4 and summary["stages"]["distill"]["tokens"] == 4 * 8 * 64
    for key in ("teacher", "student_init", "swa"):
        assert "nll" in summary["baselines"][key]
    assert summary["baselines"]["teacher"]["kl"] == pytest.approx(0, abs=1e-6)
    report = (run / "report.md").read_text()
    for needle in (
        "| teacher |",
        "window 64 + 4 sinks",
        "student after distill",
        "tokens/s",
        "heldout_curve.png",
    ):
        assert needle in report
    assert (run / "loss_curves.png").is_file() and (run / "heldout_curve.png").is_file()
    assert load_recipe(run / "config.yaml").distill.max_steps == 4  # the resolved config, overrides included
    # the same command again: nothing left to do, stages are restored, not retrained
    before = load_file(run / "final" / "model.safetensors")
    assert main(args) == 0
    assert "already done" in capsys.readouterr().out
    after = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_convert_interrupted_then_resumed_equals_uninterrupted(shared, tmp_path, monkeypatch):
    base = ["convert", "--recipe", "stories260k", _teacher(shared), *TINY]
    assert main([*base, f"out_dir={tmp_path / 'a'}"]) == 0

    import arwkv.recipes.distill as distill_mod

    real_train = distill_mod.train

    def interrupted(*args, **kwargs):
        def ctrl_c(step, record):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

        return real_train(*args, on_step=ctrl_c, **kwargs)

    monkeypatch.setattr(distill_mod, "train", interrupted)
    assert main([*base, f"out_dir={tmp_path / 'b'}"]) == 130
    monkeypatch.setattr(distill_mod, "train", real_train)
    assert main([*base, f"out_dir={tmp_path / 'b'}"]) == 0
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [
        json.loads(x)["loss"]
        for x in (tmp_path / "a/distill/metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    lb = [
        json.loads(x)["loss"]
        for x in (tmp_path / "b/distill/metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert la == lb and len(la) == 4


def test_tokenizer_that_does_not_match_the_teacher(shared, tmp_path, capsys):
    code = main(
        [
            "convert",
            "--recipe",
            "stories260k",
            _teacher(shared),
            f"out_dir={tmp_path / 'r'}",
            f"teacher.tokenizer={shared / 'assets/qwen2-tokenizer'}",
            "processes=1",  # the check runs in the workers; one process keeps its message in this one
        ]
    )
    assert code == 2
    assert "does not match" in capsys.readouterr().err


def test_data_files_need_a_tokenizer(shared, tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    code = main(
        [
            "convert",
            "--recipe",
            "stories260k",
            _teacher(shared),
            f"out_dir={tmp_path / 'r'}",
            f"data.train=[{f}]",
            "processes=1",
        ]
    )
    assert code == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x00\xff\xfe garbage \x00"])
def test_empty_or_unreadable_data_file(qwen_tok_teacher, tmp_path, content, capsys):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    code = main(
        [
            "convert",
            "--recipe",
            "stories260k",
            f"teacher.path={qwen_tok_teacher}",
            f"out_dir={tmp_path / 'r'}",
            f"data.train=[{f}]",
            "data.heldout.source=split",
            "processes=1",
            "student.mixer.head_size=8",  # the tiny teacher is 16 wide
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert str(f) in err or "data" in err.lower()


def test_full_disk_during_a_stage_keeps_the_last_checkpoint(shared, tmp_path, monkeypatch, capsys):
    from arwkv.train import checkpoint as ckpt

    real = ckpt._write

    def write(path, writer):
        if "step_000002" in str(path) and path.name == "model.safetensors":
            raise OSError(28, "No space left on device")
        return real(path, writer)

    monkeypatch.setattr(ckpt, "_write", write)
    run = tmp_path / "r"
    code = main(
        [
            "convert",
            "--recipe",
            "stories260k",
            _teacher(shared),
            f"out_dir={run}",
            *TINY,
            "align.ckpt_interval=1",
        ]
    )
    assert code == 2
    assert "No space left" in capsys.readouterr().err
    assert [p.name for p in (run / "align" / "checkpoints").iterdir()] == ["step_000001"]


def test_pipeline_api_without_cli(shared, tmp_path):
    """The Python API underneath the CLI, as from a notebook."""
    cfg = load_recipe(
        "stories260k",
        [_teacher(shared), f"out_dir={tmp_path / 'nb'}", *TINY, "distill.enabled=false", "align.max_steps=1"],
    )
    result = convert_mod.run(cfg)
    assert (result.final_dir / "config.json").is_file()
    assert list(result.summary["stages"]) == ["align"]


def test_bf16_auto_runs_what_the_cpu_computes_fast(shared, tmp_path, monkeypatch, capsys):
    """bf16=auto on a CPU without native bf16 trains in fp32, says so, and records the choice it made."""
    from arwkv.ops import precision

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    cfg = load_recipe(
        "stories260k",
        [
            _teacher(shared),
            f"out_dir={tmp_path / 'auto'}",
            *TINY,
            "distill.enabled=false",
            "align.max_steps=1",
            "bf16=auto",
        ],
    )
    result = convert_mod.run(cfg)
    assert "bf16=auto: fp32" in capsys.readouterr().out
    assert result.summary["config"]["bf16"] is False
    assert load_recipe(result.run_dir / "config.yaml").bf16 is False


def test_interrupt_error_is_an_arwkv_error():
    assert issubclass(TrainingInterrupted, Exception) and issubclass(DataError, Exception)
    assert sys.modules["arwkv.cli"]


@pytest.mark.slow
def test_convert_with_two_local_processes(shared, tmp_path, capsys):
    """`processes=2`: the command starts its own 2 DDP processes; the result is a normal run."""
    run = tmp_path / "p2"
    code = main(
        ["convert", "--recipe", "stories260k", _teacher(shared), f"out_dir={run}", *TINY, "processes=2"]
    )
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["distill"]["done"] and (run / "final" / "config.json").is_file()
    assert sorted(p.name for p in (run / "distill" / "checkpoints").iterdir())[-1] == "step_000004"
    assert (run / "distill" / "checkpoints" / "step_000004" / "rank1.pt").is_file()
