"""The local-window student (`local_window` > 0): before training it *is* the sliding-window + sinks baseline
of its teacher; the local branch holds the teacher's attention weights; its parameters form their own group;
exporters that have no such branch refuse it. (Cached generation / padding / packing / save-restore of this
variant run in test_modeling_arwkv.py's student matrix.)"""

from __future__ import annotations

import pytest
import torch

from arwkv.convert import build_student
from arwkv.convert.families import tiny_teacher
from arwkv.eval.baselines import SinkWindowBaseline
from arwkv.interop.rwkv_hybrid import export_problems
from arwkv.train.params import param_groups


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_untrained_local_window_student_is_the_swa_baseline(model_type):
    teacher = tiny_teacher(model_type, seed=3)
    student = build_student(teacher, init="copy", local_window=5, local_sinks=2).eval()
    ids = torch.randint(3, 100, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hybrid = student(ids).logits
        swa = SinkWindowBaseline(teacher, window=5, sinks=2)(input_ids=ids).logits
        pure = build_student(teacher, init="copy").eval()(ids).logits
    torch.testing.assert_close(hybrid, swa, rtol=1e-5, atol=1e-5)
    assert (pure - swa).abs().max() > 1e-2  # the pure student is not (so the check above means something)


def test_rwkv_branch_changes_the_output_once_its_gain_moves():
    teacher = tiny_teacher("llama", seed=1)
    student = build_student(teacher, init="copy", local_window=4).eval()
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = student(ids).logits
        for layer in student.model.layers:
            layer.self_attn.state_gain.fill_(0.5)
        after = student(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_local_branch_is_the_teacher_attention_and_its_own_group():
    teacher = tiny_teacher("qwen2", seed=2)
    student = build_student(teacher, init="copy", local_window=4)
    for i, layer in enumerate(student.model.layers):
        mine, theirs = layer.self_attn.local_attn.state_dict(), teacher.model.layers[i].self_attn.state_dict()
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0)
    groups = param_groups(student, 1e-4, 1e-3, freeze=["local_attention"])
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen and all(".local_attn." in n for n in frozen)
    assert any("state_gain" in n for n, p in student.named_parameters() if p.requires_grad)
    mixer_ids = {id(p) for p in groups[0]["params"]}
    assert all(id(p) not in mixer_ids for p in student.parameters() if not p.requires_grad)


def test_exporters_refuse_the_local_branch():
    student = build_student(tiny_teacher("qwen2"), init="copy", local_window=4)
    assert any("local_window 4" in p for p in export_problems(student))


def test_negative_window_is_refused():
    with pytest.raises(ValueError, match="local_window"):
        build_student(tiny_teacher("llama"), init="copy", local_window=-1)
