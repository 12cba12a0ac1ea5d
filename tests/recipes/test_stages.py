"""Stage recipes on tiny models: stage-1 plumbing (exact zero for the teacher's own attention), stage-2 KL
against full logits (also with a larger-vocabulary teacher), freeze switches, SFT masks and the one shift."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from toys import real_pair, stage_cfg, tiny_student, tiny_teacher  # noqa: E402

from arwkv.data.packing import PackedCorpus, PackedLoader  # noqa: E402
from arwkv.recipes.align import AlignTask, run_align  # noqa: E402
from arwkv.recipes.distill import DistillTask  # noqa: E402
from arwkv.recipes.sft import SFTTask  # noqa: E402
from arwkv.train.losses import kl_loss  # noqa: E402
from arwkv.train.params import param_groups  # noqa: E402


def _batch(vocab=100, b=2, t=12, seed=0):
    ids = torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(t).expand(b, t).contiguous(),
    }


def test_stage1_loss_is_zero_for_the_teachers_own_attention():
    teacher, student = real_pair(softmax_layers=[1])  # layer 1 keeps the teacher's softmax attention
    batch = _batch()
    kept, _, _ = AlignTask(student, teacher, layers=[1])(batch)
    assert kept.item() == 0.0
    rwkv, n, _ = AlignTask(student, teacher)(batch)  # default: the RWKV layers 0 and 2
    assert rwkv.item() > 0 and n == batch["input_ids"].numel()


def test_stage1_loss_zero_through_the_generic_mixer_path():
    teacher = tiny_teacher()
    same = tiny_student(teacher, mixer="teacher-attention")
    loss, _, _ = AlignTask(same, teacher)(_batch(vocab=64))
    assert loss.item() == 0.0
    toy = tiny_student(teacher, mixer="toy")
    loss, _, _ = AlignTask(toy, teacher, loss="l2")(_batch(vocab=64))
    assert loss.item() > 0


def test_stage1_trains_only_mixers_and_loss_falls(tmp_path):
    teacher, student = real_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ids = torch.randint(3, 100, (16, 16), generator=torch.Generator().manual_seed(1))
    loader = PackedLoader(PackedCorpus.from_sequences(ids), 4, seed=0)
    res = run_align(
        student, teacher, loader, stage_cfg(max_steps=15, lr=1e-2, loss="mse", ckpt_interval=100), tmp_path
    )
    losses = [r["loss"] for r in res.history]
    assert losses[-1] < losses[0]
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(".self_attn." in k for k in moved)  # only mixer tensors changed
    assert all(p.grad is None for p in teacher.parameters())


def test_stage1_with_packed_documents_and_padding():
    teacher, student = real_pair()
    ids = torch.randint(3, 100, (6, 16), generator=torch.Generator().manual_seed(2))
    rows = PackedCorpus.from_sequences(ids, lengths=[5, 9, 16, 7, 3, 11], whole=True)
    batch = rows.batch([0, 1])
    loss, n, _ = AlignTask(student, teacher)(batch)
    assert torch.isfinite(loss) and n == int(batch["attention_mask"].sum())


def test_stage2_kl_equals_kl_of_full_logits():
    teacher, student = real_pair()
    batch = _batch()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    batch["attention_mask"] = mask.long()
    total, n, parts = DistillTask(student, teacher, temperature=2.0, chunk_size=5)(batch)
    ref, m = kl_loss(student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits, mask, 2.0)
    assert n == m == 20
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
    assert parts["ce"].item() == 0.0


def test_stage2_larger_teacher_with_padded_vocabulary():
    from arwkv.convert.families import tiny_teacher as family_teacher

    _, student = real_pair()
    big = family_teacher("llama", seed=3, vocab_size=112, hidden_size=48, num_hidden_layers=2)
    batch = _batch()
    total, n, _ = DistillTask(student, big)(batch)
    ref, _ = kl_loss(student(batch["input_ids"]).logits, big(batch["input_ids"]).logits[..., :100])
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)


def test_freeze_switches_and_mixer_lr():
    _, student = real_pair()
    groups = param_groups(student, lr=1e-4, mixer_lr=1e-3, freeze=["mlp", "embeddings", "norms"])
    assert groups[0]["name"] == "mixers" and groups[0]["lr"] == 1e-3 and groups[1]["lr"] == 1e-4
    names = {id(p): n for n, p in student.named_parameters()}
    rest = [names[id(p)] for p in groups[1]["params"]]
    assert rest == ["lm_head.weight"]
    assert not student.model.embed_tokens.weight.requires_grad
    assert not any(p.requires_grad for p in student.model.layers[0].mlp.parameters())
    assert all(".self_attn." in names[id(p)] for p in groups[0]["params"])
    assert student.config.tie_word_embeddings is False  # lm_head untied for distillation


def test_sft_loss_counts_assistant_tokens_with_one_shift():
    _, student = real_pair()
    batch = _batch(t=10)
    loss_mask = torch.zeros(2, 10, dtype=torch.long)
    loss_mask[:, 6:9] = 1  # the assistant's reply: tokens 6, 7, 8
    batch["loss_mask"] = loss_mask
    total, n, _ = SFTTask(student, chunk_size=3)(batch)
    logits = student(batch["input_ids"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    ids = batch["input_ids"]
    manual = -sum(logp[b, t, ids[b, t + 1]] for b in range(2) for t in (5, 6, 7))
    assert n == 6
    torch.testing.assert_close(total, manual, rtol=1e-5, atol=1e-5)
    # transformers' own causal-LM loss (which shifts internally) on labels = tokens that count
    labels = ids.masked_fill(loss_mask == 0, -100)
    hf = student(ids, labels=labels).loss
    torch.testing.assert_close(total / n, hf, rtol=1e-5, atol=1e-6)


def test_sft_count_matches_forward():
    _, student = real_pair()
    batch = _batch()
    batch["loss_mask"] = (torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) > 0.5).long()
    task = SFTTask(student)
    assert task.count(batch) == task(batch)[1]


@pytest.mark.parametrize("kind", ["mse", "l2"])
def test_align_task_count(kind):
    teacher, student = real_pair()
    batch = _batch()
    batch["attention_mask"][0, 9:] = 0
    task = AlignTask(student, teacher, loss=kind)
    assert task.count(batch) == task(batch)[1] == 21
