"""The scorer on the arwkv student (a recurrent model): right padding and batching leave scores alone."""

from __future__ import annotations

import math

import pytest

from arwkv.eval.loglik import score_tokens

from .tiny import tiny_llama

build = pytest.importorskip("arwkv.convert.build")


def test_student_scores_do_not_depend_on_batching():
    teacher = tiny_llama(vocab_size=128)
    student = build.build_student(teacher, init="copy", head_size=8).eval()
    pairs = [([5, 9, 17, 3, 44, 2, 8, 19, 100, 7][:n], [11, 12, 13][: 1 + n % 3]) for n in range(1, 10)]
    one = score_tokens(student, pairs, batch_size=1, progress=False)
    many = score_tokens(student, pairs, batch_size=8, progress=False)
    for a, b in zip(one, many, strict=True):
        assert math.isclose(a.logprob, b.logprob, rel_tol=1e-5, abs_tol=1e-4)
        assert a.is_greedy == b.is_greedy
