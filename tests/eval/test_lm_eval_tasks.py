"""The lm-eval task files (arwkv/eval/lm_eval_tasks): data found from their own folder or $ARWKV_EVAL_DIR,
from any working directory; a clear error before any model loads; lm-eval's Python API on a tiny student
where lm-eval is installed (it is not a dependency of arwkv)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TASKS_DIR = Path(__file__).resolve().parents[2] / "arwkv" / "eval" / "lm_eval_tasks"


def _utils():
    spec = importlib.util.spec_from_file_location("lm_eval_task_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-eval's `!function module.name` tags as ("function", "module.name")."""


_TaskLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def test_task_files_read_their_data_through_utils() -> None:
    utils = _utils()
    files = sorted(TASKS_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(utils.FILES)
    for f in files:
        cfg = yaml.load(f.read_text(), Loader=_TaskLoader)
        assert cfg["task"] == f.stem
        assert "dataset_kwargs" not in cfg and "../shared" not in f.read_text()  # nothing relative to the cwd
        kind, name = cfg["custom_dataset"]
        assert kind == "function" and name.startswith("utils.")
        for value in cfg.values():  # every !function names a helper that exists
            if isinstance(value, tuple):
                assert callable(getattr(utils, value[1].removeprefix("utils."))), value


def test_data_is_found_from_any_directory(shared, tmp_path, monkeypatch) -> None:
    pytest.importorskip("datasets")
    beside = TASKS_DIR.parents[3] / "shared" / "eval"  # the default: shared/ next to this checkout
    if beside.is_dir():
        monkeypatch.delenv("ARWKV_EVAL_DIR", raising=False)
    else:  # a checkout elsewhere (ARWKV_SHARED): the variable is how the task files find the data
        monkeypatch.setenv("ARWKV_EVAL_DIR", str(shared / "eval"))
    monkeypatch.chdir(tmp_path)  # not the repository root: the old relative paths failed here
    utils = _utils()
    assert utils.eval_dir().resolve() == (shared / "eval").resolve()
    lambada = utils.lambada_openai()["test"]
    first = json.loads((shared / "eval/lambada_openai/lambada_openai.jsonl").open().readline())
    assert len(lambada) == 5153 and lambada[0] == first
    piqa = utils.piqa(version=1.0)["validation"]  # lm-eval passes the task's metadata as keywords
    labels = (shared / "eval/piqa/valid-labels.lst").read_text().split()
    assert len(piqa) == len(labels) == 1838 and [d["label"] for d in piqa.select(range(5))] == [
        int(x) for x in labels[:5]
    ]
    assert len(utils.blimp()["test"]) == 4000


def test_missing_data_is_one_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ARWKV_EVAL_DIR", str(tmp_path / "nowhere"))
    utils = _utils()
    with pytest.raises(FileNotFoundError) as e:
        utils.arc_easy()
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "arc_easy" / "arc_easy.jsonl") in msg and "Set ARWKV_EVAL_DIR" in msg
    assert utils.missing_files(["piqa_local"]) == [
        tmp_path / "nowhere" / "piqa" / "valid.jsonl",
        tmp_path / "nowhere" / "piqa" / "valid-labels.lst",
    ]


def test_launcher_checks_the_data_before_lm_eval_loads_a_model(tmp_path) -> None:
    cmd = [
        sys.executable,
        str(TASKS_DIR / "run_lm_eval.py"),
        "--model",
        "hf",
        "--model_args",
        "pretrained=/no/such/model",
        "--tasks",
        "lambada_openai_local,arc_easy_local",
    ]
    env = {"ARWKV_EVAL_DIR": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert "lm-eval task data not found" in line and "lambada_openai.jsonl (and 1 more)" in line


def test_launcher_names_the_install_line(shared, tmp_path) -> None:
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here: the launcher would run it")
    cmd = [sys.executable, str(TASKS_DIR / "run_lm_eval.py"), "--tasks", "lambada_openai_local"]
    env = {"ARWKV_EVAL_DIR": str(shared / "eval"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and 'pip install "lm-eval[hf]"' in out.stderr


def test_lm_eval_python_api_on_a_tiny_student(shared, tmp_path, monkeypatch) -> None:
    """Optional: lm-eval (not an arwkv dependency) scores a tiny student with these task files."""
    lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install "lm-eval[hf]")')
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from arwkv.convert.build import build_student
    from arwkv.convert.families import tiny_teacher

    tok = AutoTokenizer.from_pretrained(shared / "assets" / "qwen2-tokenizer")
    teacher = tiny_teacher("qwen2", vocab_size=len(tok), hidden_size=64, num_attention_heads=1)
    student = build_student(teacher, init="copy", head_size=64).eval()
    monkeypatch.setenv("ARWKV_EVAL_DIR", str(shared / "eval"))
    monkeypatch.chdir(tmp_path)
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=student, tokenizer=tok, batch_size=1, device="cpu"),
        tasks=["lambada_openai_local", "arc_easy_local"],
        limit=4,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )["results"]
    assert 0 <= results["arc_easy_local"]["acc,none"] <= 1
    assert results["lambada_openai_local"]["perplexity,none"] > 1
