"""The `arwkv` command: --help everywhere, clear errors on bad input, generation from a saved student."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from arwkv.cli import build_parser, main

SUBCOMMANDS = [
    "convert",
    "align",
    "distill",
    "sft",
    "dpo",
    "select-layers",
    "generate",
    "chat",
    "demo",
    "export",
]


def test_top_level_help_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "arwkv", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for cmd in SUBCOMMANDS + ["eval"]:
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_for_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: arwkv {cmd}" in capsys.readouterr().out


def test_every_subcommand_is_tested():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS) | {"eval"}


def test_unknown_recipe_key_is_a_clear_error(capsys):
    assert main(["convert", "--recipe", "stories260k", "distill.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key 'distill.lrr'" in err and "distill.lr" in err


def test_missing_recipe_and_bad_value(capsys):
    assert main(["convert", "--recipe", "no-such-recipe"]) == 2
    assert "shipped recipes" in capsys.readouterr().err
    assert main(["convert", "--recipe", "stories260k", "align.lr=fast"]) == 2
    assert "align.lr" in capsys.readouterr().err


def test_teacher_that_does_not_exist(tmp_path, capsys):
    code = main(
        [
            "convert",
            "--recipe",
            "stories260k",
            "teacher.path=/no/such/teacher.bin",
            f"out_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_mixer_option_that_does_not_fit_the_teacher(shared, tmp_path, capsys):
    """head_size 48 does not divide the mixer width: one line naming the option, no traceback."""
    teacher = shared / "assets" / "llama2c-stories260K" / "stories260K.bin"
    args = [f"teacher.path={teacher}", f"out_dir={tmp_path / 'run'}", "processes=1"]
    assert main(["convert", "--recipe", "stories260k", *args, "student.mixer.head_size=48"]) == 2
    err = capsys.readouterr().err
    assert "student.mixer" in err and "head_size 48 must divide the mixer width" in err
    assert "Traceback" not in err


def test_help_keys_lists_every_key(capsys):
    assert main(["convert", "--help-keys"]) == 0
    out = capsys.readouterr().out
    for key in ("distill.kl_temperature", "align.loss", "student.init", "data.data_free.num_sequences"):
        assert key in out


def test_generate_streams_token_ids_from_a_saved_student(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from toys import real_pair

    _, student = real_pair()
    student.save_pretrained(tmp_path / "final")
    assert (
        main(["generate", str(tmp_path / "final"), "1 5 7", "--max-new-tokens", "6", "--temperature", "0"])
        == 0
    )
    ids = capsys.readouterr().out.split()
    assert len(ids) == 6 and all(i.isdigit() for i in ids)


def test_generate_from_an_exported_rwkv_hybrid_checkpoint_matches_the_student(tmp_path, capsys):
    """A published-format (rwkv_hybrid) folder generates through the same command, with the same tokens."""
    import torch

    from arwkv.interop import export_rwkv_hybrid

    sys.path.insert(0, str(Path(__file__).parent / "interop"))
    from test_rwkv_hybrid import _student  # a student in the format's layout (head 64, its LoRA ranks)

    student = _student()
    student.save_pretrained(tmp_path / "final")
    export_rwkv_hybrid(student, tmp_path / "hybrid")
    args = ["1 5 7", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(["generate", str(tmp_path / "final"), *args]) == 0
    from_student = capsys.readouterr().out.split()
    assert main(["generate", str(tmp_path / "hybrid"), *args]) == 0
    assert capsys.readouterr().out.split() == from_student
    with torch.no_grad():
        ids = student.eval().generate(torch.tensor([[1, 5, 7]]), max_new_tokens=6, do_sample=False)
    assert [int(t) for t in from_student] == ids[0, 3:].tolist()


def test_chat_needs_a_chat_template(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from toys import real_pair

    _, student = real_pair()
    student.save_pretrained(tmp_path / "final")
    assert main(["chat", str(tmp_path / "final")]) == 2
    assert "chat template" in capsys.readouterr().err
