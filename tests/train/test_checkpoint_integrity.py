"""Checkpoints on a real full disk and damaged checkpoints on resume.

- A real tiny filesystem (a 1 MiB tmpfs, mounted when the tests run as root; skipped otherwise) fills up while
  a checkpoint is written: whatever the writer raises becomes one CheckpointError naming the free space, no
  temp folder is left, the previous checkpoint stays loadable.
- A damaged newest checkpoint (bytes changed, truncated, unreadable state) is detected by its checksums, and a
  resumed run falls back to the previous intact one, saying so, and ends equal to an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest
import torch

from arwkv.errors import CheckpointError
from arwkv.train import checkpoint as ckpt
from tests.train.test_loop import _run, _setup
from tests.train.toys import stage_cfg


@pytest.fixture
def tiny_fs(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _model_and_optimizer(n: int):
    model = torch.nn.Linear(n, n, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, n)).sum().backward()
    opt.step()
    return model, opt


def test_real_full_disk_leaves_no_temp_files_and_keeps_the_previous_checkpoint(tiny_fs):
    model, opt = _model_and_optimizer(128)  # 64 KiB weights + 128 KiB optimizer state: fits once
    first = ckpt.save_checkpoint(tiny_fs, 1, model, opt, keep=5)
    big, big_opt = _model_and_optimizer(512)  # 1 MiB of weights alone: cannot fit beside it
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(tiny_fs, 2, big, big_opt, keep=5)
    msg = str(e.value)
    assert "MiB free" in msg and "step_000001" in msg and "intact" in msg and "\n" not in msg
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["step_000001"]  # no .tmp-step_000002 left
    assert ckpt.checkpoint_problem(first) is None
    assert ckpt.load_checkpoint(first, model, opt)["step"] == 1


def _damage(path, how: str) -> None:
    f = path / ("trainer_state.json" if how == "state" else "model.safetensors")
    data = bytearray(f.read_bytes())
    if how == "flip":  # garbage inside the tensor data (up to 4 KiB), same size
        n = min(4096, len(data) // 4)
        data[-n - 8 : -8] = bytes(b ^ 0xFF for b in data[-n - 8 : -8])
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"{not json")
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "state"])
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, how):
    model, opt = _model_and_optimizer(16)
    ckpt.save_checkpoint(tmp_path, 1, model, opt, keep=5)
    newest = ckpt.save_checkpoint(tmp_path, 2, model, opt, keep=5)
    assert ckpt.checkpoint_problem(newest) is None
    _damage(newest, how)
    problem = ckpt.checkpoint_problem(newest)
    assert problem is not None
    assert ("checksum" in problem) if how == "flip" else True
    assert ckpt.latest_intact_checkpoint(tmp_path, warn=False).name == "step_000001"


def test_resume_falls_back_to_the_previous_intact_checkpoint(tmp_path, capfd):
    teacher, student, corpus = _setup()
    torch.manual_seed(7)
    full = _run(
        tmp_path / "a", teacher, student, corpus, stage_cfg(max_steps=6, ckpt_interval=2, keep_checkpoints=3)
    )

    teacher_b, student_b, _ = _setup()
    torch.manual_seed(7)
    _run(
        tmp_path / "b",
        teacher_b,
        student_b,
        corpus,
        stage_cfg(max_steps=4, ckpt_interval=2, keep_checkpoints=3),
    )
    _damage(tmp_path / "b" / "checkpoints" / "step_000004", "flip")
    capfd.readouterr()
    teacher_c, student_c, _ = _setup()
    rest = _run(
        tmp_path / "b",
        teacher_c,
        student_c,
        corpus,
        stage_cfg(max_steps=6, ckpt_interval=2, keep_checkpoints=3),
    )
    err = capfd.readouterr().err
    assert "skipping checkpoint" in err and "step_000004" in err and "checksum" in err
    assert "resuming train at step 2 of 6" in err
    assert [r["loss"] for r in full.history][2:] == [r["loss"] for r in rest.history]
    for (name, a), b in zip(student.state_dict().items(), student_c.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoints_without_checksums_still_load(tmp_path):
    import json

    model, opt = _model_and_optimizer(8)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt)
    state = json.loads((path / "trainer_state.json").read_text())
    del state["files"]  # as written before checksums existed
    (path / "trainer_state.json").write_text(json.dumps(state))
    assert ckpt.checkpoint_problem(path) is None
    assert ckpt.load_checkpoint(path, model, opt)["step"] == 1


def test_teacher_corpus_cache_on_a_full_disk_warns_and_leaves_nothing(tiny_fs):
    from arwkv.data.teacher_corpus import TeacherCorpus, _save_atomically

    n = 2048  # 2048 x 256 int32 = 2 MiB: does not fit the 1 MiB filesystem
    ids = torch.ones(n, 256, dtype=torch.long)
    lengths = torch.full((n,), 256)
    corpus = TeacherCorpus(ids, ids[:4], lengths, lengths[:4], lengths * 0, lengths[:4] * 0, meta={"k": 1})
    with pytest.warns(UserWarning, match="could not write the teacher corpus cache"):
        _save_atomically(tiny_fs / "corpus.safetensors", corpus)
    assert list(tiny_fs.iterdir()) == []  # no 0-byte or partial temp file
