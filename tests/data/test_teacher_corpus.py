"""Data-free corpus: correct sampling (greedy, left padding, distribution), caching, held-out independence."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from arwkv.data import teacher_corpus as tc
from arwkv.data.teacher_corpus import DEFAULT_PROMPTS, sample_sequences, teacher_corpus
from arwkv.errors import DataError

STORIES = "assets/llama2c-stories260K/stories260K.bin"


@functools.cache
def _stories(path: str):
    from arwkv.convert.llama2c import load_llama2c

    return load_llama2c(path)


@pytest.fixture
def stories(shared):
    return _stories(str(shared / STORIES))


@pytest.fixture
def count_sampling(monkeypatch):
    calls = []
    real = tc.sample_sequences

    def counted(*a, **kw):
        calls.append(len(a[1]))
        return real(*a, **kw)

    monkeypatch.setattr(tc, "sample_sequences", counted)
    return calls


def test_cache_hit_samples_nothing(stories, tmp_path, count_sampling):
    kw = dict(num_train=6, num_heldout=2, seq_len=24, batch_size=4, cache_dir=tmp_path, progress=False)
    first = teacher_corpus(stories, **kw)
    assert not first.from_cache and count_sampling == [4, 2, 2]
    assert first.train.shape == (6, 24) and first.heldout.shape == (2, 24)
    assert (first.train[:, 0] == 1).all() and int(first.train.max()) < 512
    assert first.train_lengths.tolist() == [24] * 6 and first.train_prompt_lengths.tolist() == [0] * 6
    count_sampling.clear()
    second = teacher_corpus(stories, **kw)
    assert second.from_cache and count_sampling == []
    assert torch.equal(first.train, second.train) and torch.equal(first.heldout, second.heldout)
    assert [
        p.name.startswith("teacher-corpus-") and p.suffix == ".safetensors" for p in tmp_path.iterdir()
    ] == [True]  # one file, no temporary left behind
    rows = second.packed("train").tensors()
    assert torch.equal(rows["input_ids"], first.train)
    assert rows["position_ids"].tolist() == [list(range(24))] * 6
    assert rows["loss_mask"][:, 0].sum() == 0 and rows["loss_mask"][:, 1:].all()


def test_settings_and_weights_key_the_cache(stories, tmp_path):
    kw = dict(num_heldout=2, seq_len=16, batch_size=2, cache_dir=tmp_path, progress=False)
    a = teacher_corpus(stories, num_train=4, **kw)
    b = teacher_corpus(stories, num_train=2, **kw)
    assert not b.from_cache and torch.equal(a.heldout, b.heldout)  # held-out set independent of num_train
    assert torch.equal(a.train[:2], b.train)
    c = teacher_corpus(stories, num_train=4, seed=1, **kw)
    assert not c.from_cache and not torch.equal(a.train, c.train)
    changed = LlamaForCausalLM(stories.config)
    changed.load_state_dict(stories.state_dict())
    with torch.no_grad():
        changed.model.norm.weight[0] += 1e-3
    assert not teacher_corpus(changed, num_train=4, **kw).from_cache
    assert teacher_corpus(changed, num_train=4, teacher_id="mine", **kw).meta["teacher"] == "mine"


def test_greedy_and_left_padding(stories):
    ids, lengths, _ = sample_sequences(stories, [[1]], 8, temperature=0)
    assert ids[0, 1:].tolist() == [461, 461, 401, 401, 401, 461, 378] and lengths.tolist() == [8]
    prompts = [[1], [1, 300, 301], [1, 50]]
    batched, _, _ = sample_sequences(stories, prompts, 12, temperature=0)
    for i, p in enumerate(prompts):
        alone, _, _ = sample_sequences(stories, [p], 12, temperature=0)
        assert torch.equal(batched[i], alone[0])


def test_first_token_follows_the_teacher_distribution(stories):
    n = 4000
    ids, _, _ = sample_sequences(stories, [[1]] * n, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = stories(torch.tensor([[1]])).logits[0, -1].softmax(-1)
    empirical = torch.bincount(ids[:, 1], minlength=512).float() / n
    assert 0.5 * (empirical - p).abs().sum() < 0.08  # total variation; the sampler's own error is ~0.03
    top1, _, _ = sample_sequences(stories, [[1]] * 50, 2, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (top1[:, 1] == p.argmax()).all()


def test_eos_stops_a_sequence(stories):
    ids, lengths, _ = sample_sequences(stories, [[1, 5], [1]], 10, eos_ids=tuple(range(512)), pad_id=0)
    assert lengths.tolist() == [3, 2] and (ids[0, 3:] == 0).all() and (ids[1, 2:] == 0).all()


def test_chat_mode_with_a_tiny_teacher(shared, tmp_path):
    tok = AutoTokenizer.from_pretrained(shared / "assets/qwen2-tokenizer")
    config = LlamaConfig(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    teacher = LlamaForCausalLM(config)
    out = teacher_corpus(
        teacher,
        tokenizer=tok,
        mode="chat",
        num_train=3,
        num_heldout=1,
        seq_len=60,
        batch_size=3,
        cache_dir=tmp_path,
        progress=False,
    )
    for i in range(3):
        n, p = int(out.train_lengths[i]), int(out.train_prompt_lengths[i])
        prompt = tok.decode(out.train[i, :p])
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
        assert any(q in prompt for q in DEFAULT_PROMPTS) and p < n <= 60
    rows = out.packed("train", seq_len=64, reply_only=True).tensors()
    assert rows["input_ids"].shape == (3, 64)  # whole conversations, one per row
    p0 = int(out.train_prompt_lengths[0])
    assert rows["loss_mask"][0, :p0].sum() == 0 and rows["loss_mask"][0, p0 : int(out.train_lengths[0])].all()


def test_mode_errors(stories):
    with pytest.raises(DataError, match="needs the teacher's tokenizer with a chat template"):
        teacher_corpus(stories, num_train=1, mode="chat", progress=False)
    with pytest.raises(DataError, match="must be 'bos' or 'chat'"):
        teacher_corpus(stories, num_train=1, mode="story", progress=False)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        bos_token_id=None,
    )
    no_bos = LlamaForCausalLM(config)
    with pytest.raises(DataError, match="no BOS token"):
        teacher_corpus(no_bos, num_train=1, progress=False)


def test_full_disk_keeps_the_samples_and_leaves_no_partial_cache(stories, tmp_path, monkeypatch):
    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tc, "save_file", no_space)
    with pytest.warns(UserWarning, match="No space left on device"):
        out = teacher_corpus(stories, num_train=2, seq_len=8, cache_dir=tmp_path, progress=False)
    assert out.train.shape == (2, 8) and list(tmp_path.iterdir()) == []


def _forward_topk(model, ids: torch.Tensor, k: int, temperature: float = 1.0):
    from arwkv.ops.divergence import teacher_topk

    with torch.no_grad():
        return teacher_topk(model(input_ids=ids).logits.float(), k, temperature)


def test_topk_recorded_while_sampling_equals_a_forward_over_the_finished_sequences(stories):
    g = torch.Generator().manual_seed(3)
    ids, lengths, rec = sample_sequences(
        stories, [[1]] * 3, 20, generator=g, record_topk=8, record_temperature=2.0
    )
    assert lengths.tolist() == [20] * 3 and rec.ids.shape == (3, 20, 8) and rec.tail_logp.shape == (3, 20)
    ref = _forward_topk(stories, ids, 8, 2.0)
    assert (rec.ids.long() == ref.ids).float().mean() > 0.99  # ties between near-equal logits may swap
    torch.testing.assert_close(rec.logp.sort(-1).values, ref.logp.sort(-1).values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec.tail_logp, ref.tail_logp, atol=1e-4, rtol=1e-4)
    plain, _, none = sample_sequences(stories, [[1]] * 3, 20, generator=torch.Generator().manual_seed(3))
    assert none is None and torch.equal(plain, ids)  # recording draws the same tokens
    with pytest.raises(DataError, match="one-token prompts"):
        sample_sequences(stories, [[1, 5], [1]], 8, record_topk=4)


def test_the_record_is_cached_with_the_corpus_and_fills_a_stage2_cache(stories, tmp_path):
    from arwkv.data.packing import MixedCorpus, PackedCorpus
    from arwkv.data.teacher_cache import TeacherCache, fill_from_samples

    kw = dict(num_train=5, num_heldout=1, seq_len=16, batch_size=4, cache_dir=tmp_path, progress=False)
    plain = teacher_corpus(stories, **kw)
    first = teacher_corpus(stories, **kw, record_topk=6)
    assert plain.train_topk is None and not first.from_cache  # another key: a corpus without a record
    assert torch.equal(plain.train, first.train)
    again = teacher_corpus(stories, **kw, record_topk=6)
    assert again.from_cache and torch.equal(again.train_topk.ids, first.train_topk.ids)
    torch.testing.assert_close(again.train_topk.logp.float(), first.train_topk.logp, atol=5e-3, rtol=1e-3)
    with pytest.raises(DataError, match="'bos' mode only"):
        teacher_corpus(stories, **{**kw, "cache_dir": None}, mode="chat", record_topk=6)

    written = again.packed("train")
    other = PackedCorpus.from_sequences(
        torch.randint(2, 500, (3, 16), generator=torch.Generator().manual_seed(1))
    )
    rows = MixedCorpus(written, other, 0.5)
    cache = TeacherCache.open(
        tmp_path / "topk", {"teacher": "t"}, num_rows=rows.num_base_rows, seq_len=16, k=6
    )
    assert fill_from_samples(cache, rows, again.train, again.train_topk) == 5
    every = np.arange(len(rows))
    absolute = rows.absolute_rows(every)
    missing = set(cache.missing(absolute).tolist())
    assert missing == set(range(5, 8))  # the three rows of other text still need the teacher
    ids, logp, tail = cache.fetch(np.arange(5))
    ref = _forward_topk(stories, again.train, 6)
    assert (ids == ref.ids).float().mean() > 0.99
    torch.testing.assert_close(logp.sort(-1).values, ref.logp.sort(-1).values, atol=5e-3, rtol=2e-3)
    torch.testing.assert_close(tail, ref.tail_logp, atol=1e-3, rtol=1e-3)
    assert fill_from_samples(cache, rows, again.train, again.train_topk) == 0  # present rows are kept
