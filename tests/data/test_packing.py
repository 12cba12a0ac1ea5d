"""Packing, the shift convention, and the loader: boundaries, determinism, exact resume, sharding."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from arwkv.data.packing import (
    PackedCorpus,
    PackedLoader,
    TokenDoc,
    build_corpus,
    check_tokenizer_vocab,
    pack_documents,
    packed_to_cu_seqlens,
)
from arwkv.errors import DataError

CHAT = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


@functools.cache
def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def qwen(shared):
    return load_tokenizer(str(shared / "assets/qwen2-tokenizer"))


def random_docs(n: int, seed: int, max_len: int = 40) -> list[TokenDoc]:
    g = np.random.default_rng(seed)
    # token values encode (document, index) so every packed token can be traced back to its source
    return [TokenDoc(np.array([1000 * (d + 1) + i for i in range(g.integers(1, max_len))])) for d in range(n)]


def segments(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Token lists of the attended segments, in row order, split where transformers' rule splits."""
    ids, am = batch["input_ids"].reshape(-1), batch["attention_mask"].reshape(-1)
    cu = packed_to_cu_seqlens(batch["position_ids"]).tolist()
    return [ids[a:b][am[a:b] == 1].tolist() for a, b in zip(cu[:-1], cu[1:], strict=True) if am[a:b].any()]


@pytest.mark.parametrize("T", [8, 16, 37])
def test_packing_keeps_every_token_and_resets_at_every_boundary(T):
    docs = random_docs(25, seed=T)
    batch = pack_documents(docs, T).tensors()
    pos, lm, am = batch["position_ids"], batch["loss_mask"], batch["attention_mask"]
    assert batch["input_ids"].shape[1] == T and all(v.dtype == torch.int64 for v in batch.values())
    assert int(am.sum()) == sum(len(d.ids) for d in docs)
    assert int((am[:-1] == 0).sum()) == 0  # only the last row may be padded
    segs = segments(batch)
    # concatenating the segments gives the documents back in order, and no segment mixes two documents
    assert sum(segs, []) == sum((d.ids.tolist() for d in docs), [])
    assert all(len({t // 1000 for t in s}) == 1 for s in segs)
    # each segment restarts at position 0, and is a document start or a continuation cut at a row start
    starts = (pos == 0) & (am == 1)
    assert int(starts.sum()) == len(segs)
    flat = batch["input_ids"].reshape(-1)
    for offset in packed_to_cu_seqlens(pos)[:-1].tolist():
        if am.reshape(-1)[offset] and flat[offset] % 1000 != 0:  # a continuation: only at a row start
            assert offset % T == 0
    assert max(len(s) for s in segs) <= T
    # the first token of every segment is not a target; every other real token is
    assert int((lm * starts).sum()) == 0 and int(lm.sum()) == int(am.sum()) - len(segs)


def test_whole_documents_do_not_straddle_rows():
    mask = np.array([0, 0, 1, 1, 1])
    docs = [
        TokenDoc(np.arange(1, 6)),
        TokenDoc(np.arange(11, 16), mask, whole=True),
        TokenDoc(np.arange(21, 33), np.ones(12, np.uint8), whole=True),
    ]
    b = pack_documents(docs, 8).tensors()
    assert b["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 0, 0, 0],
        [11, 12, 13, 14, 15, 0, 0, 0],
        [21, 22, 23, 24, 25, 26, 27, 28],
        [29, 30, 31, 32, 0, 0, 0, 0],
    ]
    assert b["loss_mask"][1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]  # padding is a segment of its own


def test_cu_seqlens_example():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    assert packed_to_cu_seqlens(pos).tolist() == [0, 3, 5, 7, 10]
    assert packed_to_cu_seqlens(torch.tensor([[5, 6, 0, 0]])).tolist() == [0, 2, 3, 4]


def test_packed_row_equals_separate_documents_for_the_teacher(shared):
    from arwkv.convert.llama2c import load_llama2c

    teacher = load_llama2c(shared / "assets/llama2c-stories260K/stories260K.bin")
    g = np.random.default_rng(0)
    docs = [TokenDoc(np.r_[1, g.integers(3, 512, n - 1)]) for n in [9, 14, 5]]
    b = pack_documents(docs, 32).tensors()
    with torch.no_grad():
        # attention_mask None + position_ids: transformers builds the block-diagonal mask from the resets
        packed = teacher(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        start = 0
        for d in docs:
            alone = teacher(torch.as_tensor(d.ids)[None]).logits[0]
            assert (packed[start : start + len(d.ids)] - alone).abs().max() < 1e-4
            start += len(d.ids)


def test_sft_labels_shifted_once(qwen):
    from arwkv.data.chat import render_chat

    ids, mask = render_chat(qwen, CHAT)
    text_a, text_b = np.arange(5) + 300_000, np.arange(4) + 300_100  # ids outside Qwen's vocabulary
    chat = TokenDoc(np.array(ids), np.array(mask), whole=True)
    b = pack_documents([TokenDoc(text_a), chat, TokenDoc(text_b)], 128).tensors()
    # the convention: logits[:, t] predict input_ids[:, t+1], counted when loss_mask[:, t+1] == 1
    targets = b["input_ids"][:, 1:][b["loss_mask"][:, 1:] == 1].tolist()
    sft_only = [t for t in targets if t < 300_000]
    assert qwen.decode(sft_only) == "Four.<|im_end|><think>\n\n</think>\n\nYou are welcome.<|im_end|>"
    assert 300_000 not in targets and 300_100 not in targets  # a document's first token is never a target
    try:
        from arwkv.train.losses import shift_labels  # the training side must read the batch the same way
    except ImportError:
        return
    labels, weight = shift_labels(b["input_ids"], b["loss_mask"], b["position_ids"])
    assert labels[weight.bool()].tolist() == targets


def test_build_corpus_text_and_chat(tmp_path, qwen):
    (tmp_path / "a.txt").write_text("Once upon a time.<|endoftext|>The end came soon after that.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"text": "Hi"}))
    corpus = build_corpus(tmp_path, qwen, 64, teacher=LlamaConfig(vocab_size=151936), progress=False)
    b = corpus.tensors()
    segs = segments(b)
    assert qwen.decode(segs[0]) == "Once upon a time."
    assert qwen.decode(segs[1]) == "The end came soon after that."
    assert qwen.decode(segs[-1]) == "Hi"
    chat_row = [r for r in range(len(b["input_ids"])) if 151644 in b["input_ids"][r].tolist()][0]
    targets = b["input_ids"][chat_row, 1:][b["loss_mask"][chat_row, 1:] == 1].tolist()
    assert "Four." in qwen.decode(targets) and "two plus two" not in qwen.decode(targets)


def test_build_corpus_disk_cache(tmp_path, qwen):
    data = tmp_path / "d.txt"
    data.write_text("<|endoftext|>".join(f"Story number {i} is short." for i in range(50)))
    first = build_corpus(data, qwen, 16, cache_dir=tmp_path / "cache", progress=False)
    again = build_corpus(data, qwen, 16, cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(again.tokens, np.memmap) and again.fingerprint == first.fingerprint
    assert all(torch.equal(first.tensors()[k], again.tensors()[k]) for k in first.tensors())
    assert len(list((tmp_path / "cache").iterdir())) == 1
    data.write_text("Something else entirely.")
    changed = build_corpus(data, qwen, 16, cache_dir=tmp_path / "cache", progress=False)
    assert changed.fingerprint != first.fingerprint and len(list((tmp_path / "cache").iterdir())) == 2
    in_memory = build_corpus(data, qwen, 16, progress=False)
    assert torch.equal(in_memory.tensors()["input_ids"], changed.tensors()["input_ids"])


def test_content_fingerprint_survives_a_new_file_date(tmp_path, qwen):
    # what a teacher cache keys on: the rows' content, so a copied or re-mounted file (new mtime, new pack)
    # still finds the teacher outputs computed for the same tokens
    import os

    data = tmp_path / "d.txt"
    data.write_text("<|endoftext|>".join(f"Story number {i} is short." for i in range(50)))
    first = build_corpus(data, qwen, 16, cache_dir=tmp_path / "cache", progress=False)
    os.utime(data, (1_000_000, 1_000_000))
    repacked = build_corpus(data, qwen, 16, cache_dir=tmp_path / "cache", progress=False)
    assert repacked.fingerprint != first.fingerprint  # the pack cache saw a changed file and re-packed
    assert repacked.base_fingerprint == first.base_fingerprint
    data.write_text("Something else entirely.")
    other = build_corpus(data, qwen, 16, cache_dir=tmp_path / "cache", progress=False)
    assert other.base_fingerprint != first.base_fingerprint


def test_tokenizer_vocab_mismatch(qwen, shared):
    from arwkv.convert.llama2c import load_llama2c

    teacher = load_llama2c(shared / "assets/llama2c-stories260K/stories260K.bin")
    with pytest.raises(DataError, match=r"\(151669 tokens\) does not match teacher .*vocabulary 512"):
        check_tokenizer_vocab(qwen, teacher)
    with pytest.raises(DataError, match="embedding rows would never be used"):
        check_tokenizer_vocab(qwen, LlamaConfig(vocab_size=262144))
    check_tokenizer_vocab(qwen, LlamaConfig(vocab_size=151936))  # Qwen's padded embedding table is fine
    stories = shared / "assets/tinystories-samples/tinystories_sample.txt"
    with pytest.raises(DataError, match="does not match teacher"):
        build_corpus(stories, qwen, 64, teacher=teacher, progress=False)


def test_empty_data_file_through_build_corpus(tmp_path, qwen):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        build_corpus(tmp_path / "empty.jsonl", qwen, 16, progress=False)


def rows_of(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


@pytest.fixture
def corpus() -> PackedCorpus:
    # 20 rows whose first token is the row number: batches can be read as row indices
    ids = np.repeat(np.arange(20)[:, None], 6, axis=1)
    return PackedCorpus.from_sequences(ids)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_order_is_seeded(corpus):
    a = rows_of(take(PackedLoader(corpus, 4, seed=1), 10))
    b = rows_of(take(PackedLoader(corpus, 4, seed=1), 10))
    c = rows_of(take(PackedLoader(corpus, 4, seed=2), 10))
    assert a == b and a != c
    epoch0 = sum(a[:5], [])
    assert sorted(epoch0) == list(range(20)) and epoch0 != list(range(20))  # a permutation, not the identity
    assert sum(a[5:10], []) != epoch0  # each epoch has its own order
    plain = rows_of(take(PackedLoader(corpus, 4, shuffle=False), 6))
    assert sum(plain, []) == list(range(20)) + list(range(4))


@pytest.mark.parametrize("k", [0, 3, 7])
def test_resume_gives_exactly_the_following_batches(corpus, k):
    loader = PackedLoader(corpus, 3, seed=5)
    take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip (checkpoint files)
    expected = take(loader, 9)  # crosses an epoch boundary (20 rows, 3 per batch)
    resumed = PackedLoader(corpus, 3, seed=5)
    resumed.load_state_dict(state)
    got = take(resumed, 9)
    for e, g in zip(expected, got, strict=True):
        assert all(torch.equal(e[key], g[key]) for key in e)


def test_resume_refuses_other_data(corpus):
    state = PackedLoader(corpus, 4).state_dict()
    other = PackedCorpus.from_sequences(np.ones((20, 6), np.int64))
    with pytest.raises(DataError, match="fingerprint .* the data or its settings changed"):
        PackedLoader(other, 4).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        PackedLoader(corpus, 4, seed=9).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 4])
def test_sharding_is_disjoint_complete_and_matches_one_process(corpus, world):
    steps = 5  # 5 steps x 4 global rows = one epoch of 20 rows
    single = rows_of(take(PackedLoader(corpus, 4, seed=3), steps))
    ranks = [
        rows_of(take(PackedLoader(corpus, 4 // world, seed=3, rank=r, world_size=world), steps))
        for r in range(world)
    ]
    for s in range(steps):
        per_rank = [ranks[r][s] for r in range(world)]
        assert sorted(sum(per_rank, [])) == sorted(single[s])  # same global batch as 1 process
    everything = sum((sum(r, []) for r in ranks), [])
    assert sorted(everything) == list(range(20))  # disjoint and complete over the epoch


def test_finite_epochs_and_views(corpus):
    loader = PackedLoader(corpus, 6, shuffle=False, epochs=1)
    batches = list(loader)
    assert len(loader) == 4 and [len(b["input_ids"]) for b in batches] == [6, 6, 6, 2]
    train, held = corpus.split(5, seed=0)
    t_rows, h_rows = sum(rows_of([train.tensors()]), []), sum(rows_of([held.tensors()]), [])
    assert len(h_rows) == 5 and sorted(t_rows + h_rows) == list(range(20))
    assert train.fingerprint != corpus.fingerprint != held.fingerprint
    assert sorted(sum(rows_of(list(PackedLoader(held, 2, epochs=1))), [])) == sorted(h_rows)


def test_full_disk_while_caching_leaves_no_partial_cache(tmp_path, qwen, monkeypatch):
    from arwkv.data import packing

    data = tmp_path / "d.txt"
    data.write_text("<|endoftext|>".join(f"Story {i}." for i in range(40)))

    def no_space(self, tokens, flags):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packing._RowSink, "append", no_space)
    with pytest.raises(DataError, match="could not write the packed data cache .*No space left"):
        build_corpus(data, qwen, 8, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
