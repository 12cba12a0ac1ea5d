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
    teacher = tiny_teacher(
        "qwen2", vocab_size=len(tok), hidden_size=64, num_attention_heads=1, num_key_value_heads=1
    )
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


# The scoring keys of lm-eval's own BLiMP template (lm_eval/tasks/blimp/_template_yaml). It sets no
# target_delimiter, so lm-eval's default " " goes in front of each sentence.
LM_EVAL_BLIMP = {
    "output_type": "multiple_choice",
    "doc_to_text": "",
    "doc_to_target": 0,
    "doc_to_choice": "{{[sentence_good, sentence_bad]}}",
    "num_fewshot": 0,
}


def _lm_eval_blimp_template() -> Path:
    return Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / "blimp" / "_template_yaml"


def _task_file(name: str) -> dict:
    return yaml.load((TASKS_DIR / f"{name}.yaml").read_text(), Loader=_TaskLoader)


def test_blimp_task_file_matches_lm_evals_blimp_task() -> None:
    cfg = _task_file("blimp_local")
    assert {k: cfg.get(k) for k in LM_EVAL_BLIMP} == LM_EVAL_BLIMP
    assert "target_delimiter" not in cfg  # the default " ", as in lm-eval's template (a "" here was issue 17)
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc"]
    if importlib.util.find_spec("lm_eval") is not None:  # and the template itself, where lm-eval is installed
        real = yaml.load(_lm_eval_blimp_template().read_text(), Loader=_TaskLoader)
        assert {k: real.get(k) for k in LM_EVAL_BLIMP} == LM_EVAL_BLIMP and "target_delimiter" not in real


def test_lm_eval_builds_arwkv_requests(shared, tmp_path, monkeypatch) -> None:
    """Optional: lm-eval's own request construction from these task files gives arwkv's request strings,
    its HF model scores them as arwkv does, and BLiMP's requests equal those of lm-eval's BLiMP template."""
    pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install "lm-eval[hf]")')
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict
    from transformers import AutoTokenizer

    from arwkv.eval.loglik import loglikelihood
    from arwkv.eval.tasks import get_task

    from .tiny import tiny_llama

    monkeypatch.setenv("ARWKV_EVAL_DIR", str(shared / "eval"))
    monkeypatch.chdir(tmp_path)
    # lm-eval's BLiMP template with only the data swapped for the local copy
    template = _lm_eval_blimp_template()
    folder = tmp_path / "tasks"
    folder.mkdir()
    for f in [*TASKS_DIR.glob("*.yaml"), TASKS_DIR / "utils.py"]:
        (folder / f.name).write_text(f.read_text())
    (folder / "blimp_lm_eval_template.yaml").write_text(
        f"include: {template}\ntask: blimp_lm_eval_template\ndataset_path: null\n"
        "custom_dataset: !function utils.blimp\nvalidation_split: test\n"
    )
    tasks = get_task_dict([*_utils().FILES, "blimp_lm_eval_template"], TaskManager(include_path=str(folder)))
    data = shared / "eval"
    tok = AutoTokenizer.from_pretrained(shared / "assets" / "qwen2-tokenizer")
    model = tiny_llama(vocab_size=len(tok))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    for name, task in tasks.items():
        blimp = name.startswith("blimp")
        ours_task = get_task("blimp" if blimp else name.removesuffix("_local"))
        # lm-eval reads BLiMP's paradigms one after another, arwkv interleaves them: pairs 0 and 1 of each
        ids = [0, 1000, 2000, 3000, 1, 1001, 2001, 3001] if blimp else [0, 1, 2, 3]
        task.build_all_requests(samples=ids, rank=0, world_size=1)
        # with `samples`, lm-eval numbers the chosen documents 0, 1, ... in dataset order
        picked = sorted(ids)
        theirs = [i.args for i in sorted(task.instances, key=lambda i: (ids.index(picked[i.doc_id]), i.idx))]
        docs = ours_task.load(data)[:8] if blimp else ours_task.load(data)[:4]
        ours = [r for d in docs for r in ours_task.requests(d)]
        assert theirs == ours, name
        if name in ("blimp_local", "arc_easy_local"):
            got = lm.loglikelihood([Instance("loglikelihood", {}, a, i) for i, a in enumerate(theirs)])
            for (ll, greedy), r in zip(got, loglikelihood(model, tok, ours, progress=False), strict=True):
                assert abs(ll - r.logprob) < 1e-4 and greedy == r.is_greedy
