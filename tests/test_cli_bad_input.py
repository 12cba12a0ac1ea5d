"""Bad input to generate / chat / eval is one clear line and exit status 2, checked before a model loads
where it can be: damaged model folders, nonsense sampling settings, token ids outside the vocabulary, empty
prompts, bad --limit, a missing or non-UTF-8 --text-file."""

from __future__ import annotations

import shutil

import pytest

from arwkv.cli import main


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from arwkv.convert import build_student
    from arwkv.convert.families import tiny_teacher

    path = tmp_path_factory.mktemp("student") / "good"
    build_student(tiny_teacher("llama"), init="copy").save_pretrained(path)
    return path


def _damaged(student_dir, tmp_path, how: str):
    bad = tmp_path / how
    shutil.copytree(student_dir, bad)
    if how == "garbage-config":
        (bad / "config.json").write_text("{not json")
    elif how == "list-config":
        (bad / "config.json").write_text("[1, 2]")
    elif how == "truncated-weights":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (bad / "model.safetensors").write_bytes(b"")
    return bad


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if "[arwkv]" in x]  # (transformers' loading bars may be there too)
    assert len(lines) == 1 and lines[0].startswith("[arwkv] error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("how", ["garbage-config", "list-config", "truncated-weights", "empty-weights"])
@pytest.mark.parametrize("verb", ["generate", "eval"])
def test_a_damaged_model_folder_is_one_line(student_dir, tmp_path, capsys, how, verb):
    bad = _damaged(student_dir, tmp_path, how)
    if verb == "generate":
        code = main(["generate", str(bad), "1 2", "--max-new-tokens", "1"])
    else:
        code = main(["eval", str(bad), "--tasks", "wikitext", "--limit", "1", "--out", str(tmp_path / "ev")])
    want = "config.json" if "config" in how else "model.safetensors"
    _one_line_error(capsys, code, want, "re-download")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1"),
        (["--temperature", "-1"], "--temperature must be ≥ 0"),
        (["--top-k", "-2"], "--top-k must be ≥ 0"),
    ],
)
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_nonsense_sampling_settings_are_refused_before_loading(tmp_path, capsys, verb, args, needle):
    missing = tmp_path / "no-model-here"  # never loaded: the settings are checked first
    _one_line_error(capsys, main([verb, str(missing), *args]), needle)


@pytest.mark.parametrize("prompt", ["9999", "-5", "3 100"])
def test_token_ids_outside_the_vocabulary(student_dir, capsys, prompt):
    _one_line_error(capsys, main(["generate", str(student_dir), prompt]), "outside this model's vocabulary")


def test_a_blank_prompt_starts_from_bos(student_dir, capsys):
    assert main(["generate", str(student_dir), " ", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.split()) == 2


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_must_be_positive(tmp_path, capsys, limit):
    code = main(["eval", str(tmp_path / "unused"), "--tasks", "wikitext", f"--limit={limit}"])
    _one_line_error(capsys, code, "--limit must be at least 1")


def test_eval_text_file_missing_or_not_utf8(tmp_path, capsys):
    code = main(["eval", "unused", "--tasks", "wikitext", "--text-file", str(tmp_path / "none.txt")])
    _one_line_error(capsys, code, "no such file")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code = main(["eval", "unused", "--tasks", "wikitext", "--text-file", str(tmp_path / "latin1.txt")])
    _one_line_error(capsys, code, "not UTF-8")


def test_eval_fp64_and_bf16_exclude_each_other(capsys):
    assert main(["eval", "x", "--fp64", "--bf16"]) != 0
    err = capsys.readouterr().err
    assert "--fp64 and --bf16 exclude each other" in err and "Traceback" not in err
