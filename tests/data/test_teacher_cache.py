"""TeacherCache: round trip, mismatched keys refused, corrupt rows recomputed, no half cache trusted."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

from arwkv.data.packing import MixedCorpus, PackedCorpus, PackedLoader
from arwkv.data.teacher_cache import TeacherCache, bytes_per_token
from arwkv.errors import DataError

KEY = {"teacher": "t0", "tokenizer": "tok0", "data": "d0", "temperature": 1.0, "compute": "float32"}


def _entries(m, t=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (m, t, k), generator=g)
    logp = -torch.rand(m, t, k, generator=g) * 5
    tail = -torch.rand(m, t, generator=g)
    return ids, logp, tail


def _open(tmp_path, key=KEY, k=3, rank=0):
    return TeacherCache.open(tmp_path, key, num_rows=6, seq_len=5, k=k, rank=rank)


def test_rows_written_are_read_back_and_reused_by_a_later_open(tmp_path):
    cache = _open(tmp_path)
    assert list(cache.missing([4, 1, 1])) == [1, 4]
    ids, logp, tail = _entries(2)
    cache.store(np.array([1, 4]), ids, logp, tail)
    assert len(cache.missing([1, 4])) == 0 and list(cache.missing([0, 1])) == [0]
    again = _open(tmp_path)  # another run with the same key
    assert again.filled() == 2
    got_ids, got_logp, got_tail = again.fetch([4, 1])
    assert torch.equal(got_ids, ids[[1, 0]])
    torch.testing.assert_close(got_logp, logp[[1, 0]], atol=5e-3, rtol=1e-3)  # stored as fp16
    assert torch.equal(got_tail, tail[[1, 0]])
    assert bytes_per_token(64) == 388


def test_a_cache_for_another_teacher_or_k_is_refused_with_the_difference_named(tmp_path):
    cache = _open(tmp_path)
    # same folder name forced: rewrite its meta as if another teacher had written it
    meta = json.loads((cache.folder / "meta.json").read_text())
    (cache.folder / "meta.json").write_text(json.dumps({**meta, "teacher": "someone-else", "k": 7}))
    with pytest.raises(DataError, match=r"another k, teacher .*someone-else"):
        _open(tmp_path)
    # a different key never lands in the same folder
    other = _open(tmp_path, {**KEY, "tokenizer": "tok1"})
    assert other.folder != cache.folder and other.filled() == 0


def test_corrupt_bytes_make_a_row_missing_again(tmp_path):
    cache = _open(tmp_path)
    cache.store(np.array([0, 2]), *_entries(2))
    with open(cache.folder / "logp.npy", "r+b") as f:  # garbage inside row 2's data
        f.seek(cache.logp.offset + 2 * 5 * 3 * 2 + 4)
        f.write(b"\xff\x7f\xff\x7f")
    again = _open(tmp_path)
    assert list(again.missing([0, 2])) == [2] and again.rebuilt == 1


def test_a_truncated_array_is_refused(tmp_path):
    cache = _open(tmp_path)
    path = cache.folder / "ids.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="ids.npy|unreadable"):
        _open(tmp_path)


def test_rows_written_without_their_record_are_not_trusted(tmp_path, monkeypatch):
    import arwkv.data.teacher_cache as tc

    cache = _open(tmp_path)

    def killed(path, arr):  # the process dies after the data, before the checksum record
        raise KeyboardInterrupt

    monkeypatch.setattr(tc, "_save_npy_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.store(np.array([3]), *_entries(1))
    monkeypatch.undo()
    assert list(_open(tmp_path).missing([3])) == [3]


def test_a_full_disk_at_creation_leaves_nothing_behind(tmp_path, monkeypatch):
    import arwkv.data.teacher_cache as tc

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tc.os, "posix_fallocate", full, raising=False)
    with pytest.raises(DataError, match="No space left.*free disk space"):
        _open(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temp folder, no half cache
    monkeypatch.undo()
    assert _open(tmp_path).filled() == 0


def test_two_ranks_see_each_others_rows(tmp_path):
    r0, r1 = _open(tmp_path, rank=0), _open(tmp_path, rank=1)
    r0.store(np.array([0]), *_entries(1, seed=1))
    r1.store(np.array([5]), *_entries(1, seed=2))
    assert len(r0.missing([0, 5])) == 0 and len(r1.missing([0, 5])) == 0


def _corpus(n, offset=0):
    ids = np.arange(n * 4).reshape(n, 4) + offset
    return PackedCorpus.from_sequences(ids, 4)


def test_mixed_corpus_holds_the_fraction_and_numbers_rows_uniquely():
    a, b = _corpus(3), _corpus(10, offset=1000)
    mix = MixedCorpus(a, b, fraction=0.3)
    assert len(mix) == 15  # 10 real rows are 70%: the 3 teacher rows repeat to 30%
    batch = mix.batch(np.arange(len(mix)))
    from_a = (batch["input_ids"][:, 0] < 1000).sum().item()
    assert from_a == round(0.3 * len(mix))
    rows = mix.absolute_rows(np.arange(len(mix)))
    assert set(rows) == set(range(13))  # a's rows 0-2, b's rows 3-12, every one used
    # the same absolute row always carries the same tokens
    first = {}
    for r, t in zip(rows, batch["input_ids"], strict=True):
        assert torch.equal(first.setdefault(int(r), t), t)
    loader = PackedLoader(mix, 5, seed=0, with_row_ids=True)
    b0 = next(loader)
    assert b0["row_ids"].shape == (5,) and b0["input_ids"].shape == (5, 4)
