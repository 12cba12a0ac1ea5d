"""`dpo:` in a recipe and `arwkv dpo`: the data-free preference stage end to end on stories260K (held-out
pairs before/after, curves, report), and bad preference files as one clear line before anything is sampled."""

from __future__ import annotations

import json

import pytest

from arwkv.cli import main
from arwkv.config import load_recipe

DPO = [
    "dpo.enabled=true",
    "dpo.seq_len=48",
    "dpo.batch_size=4",
    "dpo.max_steps=4",
    "dpo.warmup_steps=1",
    "dpo.lr=1e-3",
    "dpo.log_interval=1",
    "dpo.eval_interval=2",
    "dpo.heldout_pairs=4",
    "dpo.data_free.num_pairs=8",
    "dpo.data_free.prompt_min=2",
    "dpo.data_free.prompt_max=8",
    "dpo.data_free.reply_len=16",
    "dpo.data_free.batch_size=8",
]


def _teacher(shared) -> str:
    return f"teacher.path={shared / 'assets/llama2c-stories260K/stories260K.bin'}"


def test_dpo_is_off_by_default_and_after_sft():
    from arwkv.config import STAGES

    cfg = load_recipe("stories260k")
    assert cfg.dpo.enabled is False and cfg.dpo.loss == "dpo" and STAGES[-2:] == ("sft", "dpo")


@pytest.mark.slow
def test_convert_with_data_free_dpo_stage(shared, tmp_path, capsys, tiny_stages):
    run = tmp_path / "st"
    args = ["convert", "--recipe", "stories260k", _teacher(shared), f"out_dir={run}", *tiny_stages, *DPO]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    st = summary["stages"]["dpo"]
    assert st["done"] and st["steps"] == 4 and st["loss"] == "dpo"
    before, after = st["pairs"]["before"], st["pairs"]["after"]
    assert before["reward_acc"] == 0.5 and before["margin"] == 0.0  # the reference is the entering student
    assert after["pairs"] == before["pairs"] >= 1
    assert "kl" in st["before"] and "kl" in st["after"]  # the run's held-out KL to the teacher, both sides
    recs = [json.loads(x) for x in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "margin" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(0 <= r["reward_acc"] <= 1 for r in steps)
    assert any("eval/pairs_reward_acc" in r and "eval/kl" in r for r in recs)
    report = (run / "report.md").read_text()
    assert "## DPO" in report and "reward acc." in report and "dpo/dpo_curves.png" in report
    assert (run / "dpo" / "dpo_curves.png").stat().st_size > 0
    assert list((run.parent / ".cache" / "preferences").glob("preferences-*.safetensors"))
    # again: finished, nothing retrained
    assert main(args) == 0
    assert "dpo: already done" in capsys.readouterr().out


@pytest.fixture
def student_dir(shared, tmp_path):
    from arwkv.convert.build import build_student
    from arwkv.convert.llama2c import load_llama2c

    path = tmp_path / "student"
    build_student(load_llama2c(str(shared / "assets/llama2c-stories260K/stories260K.bin"))).save_pretrained(
        path
    )
    return path


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"prompt": [1, 5], "chosen": [7]}, "missing field 'rejected'"),
        ({"prompt": [1, 5], "chosen": [], "rejected": [7]}, "'chosen' is empty"),
        ({"prompt": list(range(1, 40)), "chosen": [7], "rejected": [8]}, "prompt is 39 tokens"),
    ],
)
def test_bad_preference_file_is_one_line(shared, tmp_path, capsys, student_dir, record, needle, tiny_stages):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(
        json.dumps({"prompt": [1, 2], "chosen": [3], "rejected": [4]}) + "\n" + json.dumps(record) + "\n"
    )
    args = ["dpo", "--from", str(student_dir), "--recipe", "stories260k", _teacher(shared)]
    args += [f"out_dir={tmp_path / 'run'}", "dpo.seq_len=32", f"dpo.data=[{bad}]", *tiny_stages]
    code = main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "[arwkv]" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("[arwkv] error:") and "prefs.jsonl:2" in lines[0] and needle in lines[0]
    assert not (tmp_path / ".cache").exists()  # refused before the teacher sampled anything
