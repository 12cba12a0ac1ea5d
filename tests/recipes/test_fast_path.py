"""The fast CPU path end to end on stories260K: the stage-2 teacher cache (resume exactness, reuse across
runs, refusal of a mismatched cache) and a wall-clock budget that plans, resumes and extends."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from arwkv.cli import main
from tests.recipes.test_convert import TINY, _teacher

CACHED = [*TINY, "distill.teacher_topk=16", "bf16=true"]


def _losses(run):
    return [
        json.loads(x)["loss"]
        for x in (run / "distill/metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]


@pytest.mark.slow
def test_cached_teacher_resumed_equals_uninterrupted_and_is_reused(shared, tmp_path, monkeypatch):
    import arwkv.recipes.distill as distill_mod

    base = ["convert", "--recipe", "stories260k", _teacher(shared), *CACHED]
    real_train = distill_mod.train
    seen = []
    monkeypatch.setattr(
        distill_mod, "train", lambda task, *a, **k: seen.append(task) or real_train(task, *a, **k)
    )
    assert main([*base, f"out_dir={tmp_path / 'a'}"]) == 0
    caches = list((tmp_path / ".cache" / "teacher_topk").glob("topk-*"))
    assert len(caches) == 1 and (caches[0] / "done-0.npy").is_file()
    # data-free BOS rows of the stage-2 length come with the top-k the teacher gave while writing them:
    # even the first run's stage 2 never runs the teacher
    assert [t.teacher_rows for t in seen] == [0]
    seen.clear()

    def interrupted(task, *args, **kwargs):
        seen.append(task)

        def ctrl_c(step, record):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

        return real_train(task, *args, on_step=ctrl_c, **kwargs)

    monkeypatch.setattr(distill_mod, "train", interrupted)
    assert main([*base, f"out_dir={tmp_path / 'b'}"]) == 130
    monkeypatch.setattr(
        distill_mod, "train", lambda task, *a, **k: seen.append(task) or real_train(task, *a, **k)
    )
    assert main([*base, f"out_dir={tmp_path / 'b'}"]) == 0
    # run b shares run a's cache: the teacher never ran in stage 2
    assert [t.teacher_rows for t in seen] == [0, 0]
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 4


@pytest.mark.slow
def test_top_k_changes_the_cache_and_a_tampered_one_is_refused(shared, tmp_path, capsys):
    base = ["convert", "--recipe", "stories260k", _teacher(shared), *CACHED]
    assert main([*base, f"out_dir={tmp_path / 'a'}", "align.enabled=false"]) == 0
    (folder,) = (tmp_path / ".cache" / "teacher_topk").glob("topk-*")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "teacher": "another"}))
    capsys.readouterr()
    assert main([*base, f"out_dir={tmp_path / 'b'}", "align.enabled=false"]) != 0
    err = capsys.readouterr().err
    assert "another teacher" in err and "Traceback" not in err


@pytest.mark.slow
def test_budget_plans_tokens_resumes_and_extends(shared, tmp_path, capsys):
    run = tmp_path / "r"
    over = [o for o in TINY if not o.startswith(("align.max_steps", "distill.max_steps"))]
    base = ["convert", "--recipe", "stories260k", _teacher(shared), *over, f"out_dir={run}"]
    assert main([*base, "budget.minutes=0.05", "budget.align_share=0.2"]) == 0
    plan = json.loads((run / "budget.json").read_text())
    assert plan["minutes"] == 0.05 and set(plan["tokens"]) == {"align", "distill"}
    for stage in ("align", "distill"):
        assert plan["rates"][stage] > 0
    assert plan["tokens"]["align"] == int(0.2 * 3 * plan["rates"]["align"])
    summary = json.loads((run / "summary.json").read_text())
    steps = summary["stages"]["distill"]["steps"]
    assert steps == -(-plan["tokens"]["distill"] // (8 * 64))
    # the same budget again: nothing to do
    assert main([*base, "budget.minutes=0.05", "budget.align_share=0.2"]) == 0
    assert "already done" in capsys.readouterr().out
    # a longer budget: align is kept, distill continues from its checkpoint
    assert main([*base, "budget.minutes=0.1", "budget.align_share=0.2"]) == 0
    out = capsys.readouterr().out
    assert "distill continues" in out and "align: already done" in out
    longer = json.loads((run / "budget.json").read_text())
    assert longer["tokens"]["align"] == plan["tokens"]["align"]
    assert longer["tokens"]["distill"] > plan["tokens"]["distill"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["distill"]["steps"] == -(-longer["tokens"]["distill"] // (8 * 64)) > steps
    # shrinking is refused with one line, and the run's record keeps the settings it ran with
    config_before = (run / "config.yaml").read_text()
    recorded = json.loads((run / "summary.json").read_text())["config"]
    assert main([*base, "budget.minutes=0.02"]) != 0
    assert "can only be extended" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config_before
    assert json.loads((run / "summary.json").read_text())["config"] == recorded


def test_a_second_writer_in_the_same_run_folder_is_refused(shared, tmp_path, capsys):
    import fcntl

    run = tmp_path / "r"
    run.mkdir()
    with open(run / ".lock", "a+") as held:  # as a still-running conversion holds it
        held.write("pid 4242")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["convert", "--recipe", "stories260k", _teacher(shared), *TINY, f"out_dir={run}"])
        assert code != 0
        err = capsys.readouterr().err
        assert "in use by pid 4242" in err and "Traceback" not in err
    assert not (run / "summary.json").exists()  # nothing was written by the refused run
