"""Group word problem: group axioms, targets against brute force, and that training/distillation learn."""

from __future__ import annotations

import itertools
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from arwkv.experiments import state_tracking as st
from arwkv.train.loop import TrainingInterrupted


@pytest.mark.parametrize("name,order", [("S5", 120), ("A5", 60), ("S3", 6), ("Z4", 4), ("A4", 12)])
def test_group_axioms(name, order):
    g = st.get_group(name)
    assert g.order == order
    ids = torch.arange(order)
    # closure: every row and column of the table is a permutation of the ids (a Latin square)
    assert torch.equal(g.table.sort(dim=1).values, ids.expand(order, order))
    assert torch.equal(g.table.sort(dim=0).values, ids[:, None].expand(order, order))
    # identity, inverses
    assert torch.equal(g.table[g.identity], ids) and torch.equal(g.table[:, g.identity], ids)
    assert torch.equal(g.table[ids, g.inverse], torch.full_like(ids, g.identity))
    assert torch.equal(g.table[g.inverse, ids], torch.full_like(ids, g.identity))
    # associativity on all triples (order ≤ 120 → at most 1.7M look-ups): (a·b)·c == a·(b·c)
    t = g.table
    assert torch.equal(t[t[:, :, None], ids[None, None, :]], t[ids[:, None, None], t[None, :, :]])


def test_table_matches_permutation_composition():
    g = st.symmetric_group(4)
    for i, j in itertools.product(range(g.order), repeat=2):
        p, q = g.elements[i], g.elements[j]
        # convention: p · q = apply p, then q
        assert g.elements[int(g.table[i, j])] == tuple(q[p[x]] for x in range(4))


def test_a5_is_the_even_half_of_s5_and_s5_is_not_abelian():
    s5, a5 = st.symmetric_group(5), st.alternating_group(5)
    assert set(a5.elements) < set(s5.elements) and a5.order == 60
    # A5 is closed inside S5: products of even permutations stay in A5
    assert all(st.compose(p, q) in set(a5.elements) for p in a5.elements[:12] for q in a5.elements)
    assert not torch.equal(s5.table, s5.table.T)
    assert not torch.equal(a5.table, a5.table.T)
    assert torch.equal(st.cyclic_group(6).table, st.cyclic_group(6).table.T)
    with pytest.raises(ValueError, match="unknown group"):
        st.get_group("Q8")


def test_targets_are_running_products():
    g = st.get_group("S5")
    gen = torch.Generator().manual_seed(0)
    input_ids, targets = st.make_batch(g, 4, 12, gen)
    assert input_ids.shape == (4, 13) and targets.shape == (4, 12)
    assert (input_ids[:, 0] == g.order).all()  # BOS
    for b in range(4):
        acc = tuple(range(5))
        for t in range(12):
            acc = st.compose(acc, g.elements[int(input_ids[b, t + 1])])
            assert g.elements[int(targets[b, t])] == acc


def test_training_reduces_loss_and_evaluate_reports_every_length(tmp_path):
    g = st.get_group("Z3")
    model = st.make_transformer(st.transformer_config(g, hidden_size=32, num_layers=1, head_dim=16))
    cfg = st.TrainConfig(steps=60, batch_size=32, length=8, lr=1e-2, warmup=5, log_every=20)
    hist = st.train(model, g, cfg, tmp_path)
    assert [h["step"] for h in hist] == [20, 40, 60]
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"] and 0 <= hist[-1]["token_acc"] <= 1
    res = st.evaluate(model, g, [4, 16], num_sequences=32, batch_size=16)
    assert set(res) == {4, 16} and all(0.0 <= v <= 1.0 for r in res.values() for v in r.values())
    cmp = st.compare_to_teacher(model, model, g, [4, 16], num_sequences=16)
    assert all(c["agree"] == 1.0 for c in cmp.values())
    assert all(c["agree_when_teacher_wrong"] == 1.0 for c in cmp.values() if c["teacher_wrong"] > 0)


def _stop_at(step: int):
    def on_log(record: dict) -> None:
        if record["step"] == step:  # Ctrl-C: the loop saves this step and stops
            os.kill(os.getpid(), signal.SIGINT)

    return on_log


def test_resume_continues_the_same_run(tmp_path):
    g = st.get_group("Z3")
    cfg = st.TrainConfig(steps=8, batch_size=8, length=4, warmup=2, log_every=2, checkpoint_every=4)

    def fresh():
        torch.manual_seed(0)
        return st.make_transformer(st.transformer_config(g, hidden_size=32, num_layers=1, head_dim=16))

    full = fresh()
    st.train(full, g, cfg, tmp_path / "full")
    with pytest.raises(TrainingInterrupted):
        st.train(fresh(), g, cfg, tmp_path / "resumed", on_log=_stop_at(4))
    resumed = fresh()  # a new process: the state comes from the run folder (safetensors + JSON, no pickle)
    hist = st.train(resumed, g, cfg, tmp_path / "resumed")
    assert [h["step"] for h in hist] == [2, 4, 6, 8]  # every sitting's records, each step once
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_distillation_resumed_equals_uninterrupted(tmp_path):
    from arwkv.convert.build import build_student

    g = st.get_group("Z3")
    torch.manual_seed(0)
    teacher = st.make_transformer(st.transformer_config(g, hidden_size=32, num_layers=1, head_dim=16))
    cfg = st.TrainConfig(steps=6, batch_size=8, length=6, warmup=2, log_every=1, checkpoint_every=2)

    def student():
        torch.manual_seed(1)
        return build_student(
            teacher, init="copy", wkv_backend="chunked", lora_ranks={"w": 8, "a": 8, "v": 8, "g": 8}
        )

    full = student()
    st.distill(full, teacher, g, cfg, tmp_path / "full", temperature=2.0)
    with pytest.raises(TrainingInterrupted):
        st.distill(student(), teacher, g, cfg, tmp_path / "resumed", temperature=2.0, on_log=_stop_at(3))
    resumed = student()
    st.distill(resumed, teacher, g, cfg, tmp_path / "resumed", temperature=2.0)
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_the_distillation_loss_is_the_kl_to_the_teacher():
    from arwkv.convert.build import build_student

    g = st.get_group("Z3")
    teacher = st.make_transformer(st.transformer_config(g, hidden_size=32, num_layers=1, head_dim=16))
    student = build_student(teacher, init="fresh", wkv_backend="chunked")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # a confident teacher: a KL far from fp32 rounding
    batch = next(st.WordBatches(g, 4, 5, seed=3))
    kl, n, extras = st.WordDistillTask(student, teacher, temperature=2.0)(batch)
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"]).logits[:, 1:, :-1].double() / 2.0
        zs = student(input_ids=batch["input_ids"]).logits[:, 1:, :-1].double() / 2.0
    pt, log_pt, log_ps = zt.softmax(-1), F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    hand = 4.0 * (pt * (log_pt - log_ps)).sum()  # T² · Σ KL(p_T ‖ p_S) over every position
    assert n == 4 * 5 and kl.item() == pytest.approx(hand.item(), rel=1e-5)
    right = (zs.argmax(-1) == batch["targets"]).sum().item()
    assert extras["token_acc"].item() == right
    assert not [k for k in st.WordDistillTask(student, teacher).state_dict() if k.startswith("teacher")]


def test_rwkv7_is_matched_in_size_and_learns(tmp_path):
    g = st.get_group("Z3")
    kw = dict(hidden_size=32, num_layers=1, head_dim=16)
    transformer = st.make_transformer(st.transformer_config(g, **kw))
    mixer = {"lora_ranks": {"w": 8, "a": 8, "v": 8, "g": 8}, "wkv_backend": "chunked"}
    model, cfg = st.make_matched_rwkv7(g, st.num_params(transformer), mixer, **kw)
    assert type(model).__name__ == "ArwkvForCausalLM"
    assert not any("self_attn.q_proj" in n for n, _ in model.named_parameters())  # every layer is RWKV-7
    # within one MLP unit of the Transformer's size
    assert abs(st.num_params(model) - st.num_params(transformer)) <= 3 * kw["hidden_size"] * kw["num_layers"]
    hist = st.train(
        model, g, st.TrainConfig(steps=80, batch_size=16, length=8, lr=1e-2, warmup=5, log_every=20), tmp_path
    )
    assert hist[-1]["loss"] < 0.85 * hist[0]["loss"]


def test_distillation_moves_the_student_toward_the_teacher(tmp_path):
    from arwkv.convert.build import build_student

    g = st.get_group("Z3")
    teacher = st.make_transformer(st.transformer_config(g, hidden_size=32, num_layers=1, head_dim=16))
    cfg = st.TrainConfig(steps=30, batch_size=16, length=8, lr=1e-2, warmup=5, log_every=30)
    st.train(teacher, g, cfg, tmp_path / "teacher")
    student = build_student(
        teacher, init="copy", wkv_backend="chunked", lora_ranks={"w": 8, "a": 8, "v": 8, "g": 8}
    )
    cfg = st.TrainConfig(steps=30, batch_size=16, length=8, lr=3e-3, warmup=5, log_every=10)
    hist = st.distill(student, teacher, g, cfg, tmp_path / "student")
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(not p.requires_grad for p in teacher.parameters())
