"""The training loop: exact resume, clean stop, divergence, atomic checkpoints under a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
from toys import VOCAB, real_pair, stage_cfg, teacher_corpus, tiny_student, tiny_teacher

from arwkv.data.packing import PackedCorpus, PackedLoader
from arwkv.errors import CheckpointError, TrainingDivergedError
from arwkv.recipes.distill import DistillTask
from arwkv.train import checkpoint as ckpt
from arwkv.train.loop import TrainingInterrupted, train
from arwkv.train.metrics import heldout_metrics, iter_batches
from arwkv.train.schedule import lr_factor


def _setup(seed=0):
    teacher, student = real_pair(seed)
    corpus = teacher_corpus_for(teacher)
    return teacher, student, corpus


def teacher_corpus_for(teacher, n=24, t=16):
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, teacher.config.vocab_size, (n, t), generator=g)


def _run(tmp, teacher, student, corpus, cfg, on_step=None, eval_every=0):
    rows = PackedCorpus.from_sequences(corpus)
    data = PackedLoader(rows, cfg.batch_size // cfg.grad_accum, seed=0)
    held = {"input_ids": corpus[:4]}

    def eval_fn(task):
        return heldout_metrics(task.student, teacher, iter_batches(held, 4))

    cfg.eval_interval = eval_every
    return train(
        DistillTask(student, teacher),
        data,
        cfg,
        tmp,
        on_step=on_step,
        eval_fn=eval_fn if eval_every else None,
    )


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = stage_cfg(max_steps=6, grad_accum=2)
    teacher, student, corpus = _setup()
    torch.manual_seed(7)
    full = _run(tmp_path / "a", teacher, student, corpus, cfg, eval_every=2)

    def interrupt(step, record):
        if step == 3:  # Ctrl-C in the middle of training
            os.kill(os.getpid(), signal.SIGINT)

    teacher_b, student_b, _ = _setup()
    torch.manual_seed(7)
    with pytest.raises(TrainingInterrupted) as stopped:
        _run(tmp_path / "b", teacher_b, student_b, corpus, stage_cfg(max_steps=6, grad_accum=2), interrupt, 2)
    assert stopped.value.checkpoint.name == "step_000003"
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    teacher_c, student_c, _ = _setup()  # a new process: fresh objects, state comes from the checkpoint
    torch.manual_seed(999)  # the checkpoint's RNG state must win
    rest = _run(tmp_path / "b", teacher_c, student_c, corpus, stage_cfg(max_steps=6, grad_accum=2), None, 2)

    assert [r["loss"] for r in full.history][3:] == [r["loss"] for r in rest.history]
    assert full.history[0]["loss"] == first
    for (name, a), b in zip(student.state_dict().items(), student_c.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5, 6]  # no duplicates after resume
    assert rest.tokens == full.tokens == 6 * 4 * 16


def test_finished_stage_is_not_retrained(tmp_path):
    teacher, student, corpus = _setup()
    cfg = stage_cfg(max_steps=2)
    _run(tmp_path, teacher, student, corpus, cfg)
    again = _run(tmp_path, teacher, student, corpus, stage_cfg(max_steps=2))
    assert again.history == [] and again.steps == 2


class _Exploding(torch.nn.Module):
    """Wraps a task; its loss becomes NaN on the given call."""

    def __init__(self, task, at_call):
        super().__init__()
        self.student = task.student
        object.__setattr__(self, "task", task)
        self.calls, self.at_call = 0, at_call

    def forward(self, batch):
        self.calls += 1
        total, n, extra = self.task(batch)
        return (total * float("nan") if self.calls == self.at_call else total), n, extra


def test_nan_loss_stops_with_message_and_good_checkpoint(tmp_path):
    teacher, student, corpus = _setup()
    cfg = stage_cfg(max_steps=6, ckpt_interval=100)
    data = PackedLoader(PackedCorpus.from_sequences(corpus), 4, seed=0)
    task = _Exploding(DistillTask(student, teacher), at_call=4)
    with pytest.raises(TrainingDivergedError, match="nan") as e:
        train(task, data, cfg, tmp_path)
    msg = str(e.value)
    good = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert good is not None and str(good) in msg and "learning rate" in msg
    assert good.name == "step_000003"  # the state before the step that diverged
    sd = ckpt.load_model_state(good)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_nan_at_the_first_step_after_a_resume_blames_the_checkpoint(tmp_path):
    teacher, student, corpus = _setup()
    data = PackedLoader(PackedCorpus.from_sequences(corpus), 4, seed=0)
    train(DistillTask(student, teacher), data, stage_cfg(max_steps=3, ckpt_interval=3), tmp_path)
    _, student_b, _ = _setup()
    data = PackedLoader(PackedCorpus.from_sequences(corpus), 4, seed=0)
    task = _Exploding(DistillTask(student_b, teacher), at_call=1)  # e.g. a damaged-but-finite checkpoint
    with pytest.raises(TrainingDivergedError) as e:
        train(task, data, stage_cfg(max_steps=6, ckpt_interval=3), tmp_path)
    msg = str(e.value)
    assert "first step after resuming from" in msg and "step_000003" in msg and "damaged" in msg
    assert "Lower the learning rate" not in msg


def test_full_disk_while_checkpointing_keeps_previous(tmp_path, monkeypatch):
    teacher, student, corpus = _setup()
    cfg = stage_cfg(max_steps=6, ckpt_interval=2)
    real_write = ckpt._write

    def write(path, writer):
        if path.name == "model.safetensors" and "step_000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, writer)

    monkeypatch.setattr(ckpt, "_write", write)
    with pytest.raises(CheckpointError, match="No space left") as e:
        _run(tmp_path, teacher, student, corpus, cfg)
    assert "step_000002" in str(e.value) and "intact" in str(e.value)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002"]  # no half-written folder left behind
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_000002", DistillTask(student, teacher))
    assert state["step"] == 2


def test_checkpoint_round_trip_with_tied_weights(tmp_path):
    teacher = tiny_teacher()
    model = torch.nn.ModuleDict({"m": teacher})
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    teacher(torch.randint(0, VOCAB, (2, 8))).logits.sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, data_state={"pos": 5}, trainer_state={"tokens": 1})
    other = torch.nn.ModuleDict({"m": tiny_teacher(seed=3)})
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    state = ckpt.load_checkpoint(path, other, opt2)
    assert state["data"] == {"pos": 5} and state["tokens"] == 1
    assert other["m"].lm_head.weight is other["m"].model.embed_tokens.weight
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_schedule_warmup_cosine_constant():
    assert lr_factor(0, 100, 10, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.01) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.01) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, 100, 10, 0.01) == pytest.approx(0.01)
    assert lr_factor(50, 100, 10, 0.01, "constant") == 1.0


def test_toy_student_trains_and_loss_falls(tmp_path):
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    corpus = teacher_corpus(teacher, n=16, seq_len=16)
    res = _run(tmp_path, teacher, student, corpus, stage_cfg(max_steps=12, lr=1e-2, ckpt_interval=100))
    losses = [r["loss"] for r in res.history]
    assert losses[-1] < losses[0]
    assert res.tokens_per_s > 0 and res.wall_s > 0


def _autocast_run(tmp_path, student, teacher):
    corpus = teacher_corpus_for(teacher, n=8, t=16)
    data = PackedLoader(PackedCorpus.from_sequences(corpus), 4, seed=0)
    return train(
        DistillTask(student, teacher), data, stage_cfg(max_steps=2, ckpt_interval=100), tmp_path, bf16=True
    )


def test_bf16_autocast_on_cpu(tmp_path):
    teacher = tiny_teacher()
    res = _autocast_run(tmp_path, tiny_student(teacher), teacher)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    assert next(tiny_student(teacher).parameters()).dtype == torch.float32  # master weights stay fp32


def test_bf16_autocast_with_the_arwkv_student(tmp_path):
    teacher, student = real_pair()
    res = _autocast_run(tmp_path, student, teacher)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    # the bf16 loss is the fp32 loss up to bf16 rounding of the matmuls (the WKV kernel itself stays fp32)
    corpus = teacher_corpus_for(teacher, n=4, t=16)
    batch = {"input_ids": corpus}
    task = DistillTask(student, teacher)
    with torch.no_grad():
        total32, count, _ = task(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total16, _, _ = task(batch)
    assert total16 / count == pytest.approx(float(total32 / count), rel=0.05, abs=0.02)


def test_gradient_checkpointing_gives_the_same_gradients():
    teacher, student = real_pair()
    ids = teacher_corpus_for(teacher, n=2, t=32)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(32).expand(2, 32),
    }
    task = DistillTask(student, teacher)
    task(batch)[0].backward()
    ref = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    student.activation_checkpointing_enable({"use_reentrant": False})
    task(batch)[0].backward()
    for n, p in student.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)


def test_fresh_start_discards_older_checkpoints(tmp_path):
    teacher, student, corpus = _setup()
    _run(tmp_path, teacher, student, corpus, stage_cfg(max_steps=4, ckpt_interval=2))
    teacher, student, corpus = _setup()
    rows = PackedCorpus.from_sequences(corpus)
    res = train(
        DistillTask(student, teacher),
        PackedLoader(rows, 4, seed=0),
        stage_cfg(max_steps=2),
        tmp_path,
        resume=False,
    )
    assert res.steps == 2 and len(res.history) == 2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_000002"]
