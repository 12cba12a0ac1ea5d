"""ThreadTuner: probes each thread count, keeps the fastest, probes again; the loop logs its choice."""

from __future__ import annotations

import torch
from toys import stage_cfg, teacher_corpus, tiny_student, tiny_teacher

from arwkv.data.packing import PackedCorpus, PackedLoader
from arwkv.recipes.distill import DistillTask
from arwkv.train.loop import train
from arwkv.train.threads import ThreadTuner


def drive(tuner: ThreadTuner, seconds_at: dict[int, float], steps: int) -> list[int]:
    """Run `steps` fake steps whose duration depends on the thread count set; returns the counts used."""
    used = []
    for _ in range(steps):
        n = tuner.before_step()
        assert torch.get_num_threads() == n
        used.append(n)
        tuner.after_step(seconds_at[n], 1000)
    return used


def test_tuner_keeps_the_faster_count_and_probes_again():
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(candidates=[1, 2], probe_steps=2, every=5)
        used = drive(tuner, {1: 0.5, 2: 1.0}, 4 + 5 + 4 + 1)  # probe, 5 steps, probe again, 1 step
        assert used == [1, 1, 2, 2] + [1] * 5 + [1, 1, 2, 2] + [1]
        assert tuner.rates == {1: 2000.0, 2: 1000.0}
        # the machine changes: two threads become faster, and the next probe switches
        used = drive(tuner, {1: 1.0, 2: 0.25}, 4 + 4 + 1)
        assert used[-1] == 2 and tuner.current == 2
        tuner.restore()
        assert torch.get_num_threads() == tuner.initial
    finally:
        torch.set_num_threads(before)


def test_tuner_uses_the_best_of_its_probe_steps():
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(candidates=[1, 2], probe_steps=2, every=100)
        for n, seconds in [(1, 9.0), (1, 0.5), (2, 0.8), (2, 0.9)]:  # 1 thread: a slow warm-up step first
            assert tuner.before_step() == n
            tuner.after_step(seconds, 1)
        assert tuner.current == 1
    finally:
        torch.set_num_threads(before)


def test_loop_runs_each_step_at_the_tuners_count_and_logs_it(tmp_path):
    before = torch.get_num_threads()
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    corpus = teacher_corpus(teacher, n=16, seq_len=16)
    cfg = stage_cfg(max_steps=6, lr=1e-2, ckpt_interval=100)
    data = PackedLoader(PackedCorpus.from_sequences(corpus), cfg.batch_size, seed=0)
    tuner = ThreadTuner(candidates=[1, 2], probe_steps=1, every=100)
    res = train(DistillTask(student, teacher), data, cfg, tmp_path, thread_tuner=tuner)
    counts = [r["threads"] for r in res.history]
    assert counts[:2] == [1, 2] and len(set(counts[2:])) == 1 and counts[2] == tuner.current
    assert torch.get_num_threads() == before  # restored when the stage ends
