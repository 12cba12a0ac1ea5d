"""Chat rendering: the assistant mask covers exactly the replies (+ end of turn), found two ways."""

from __future__ import annotations

import functools
import itertools

import pytest
from transformers import AutoTokenizer

from arwkv.data.chat import has_generation_tags, render_chat
from arwkv.errors import DataError

# ChatML with {% generation %} blocks (TRL-style), so transformers' own assistant mask can be compared
CHATML_GEN = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ],
    [
        {"role": "user", "content": "Say 'Hi' twice"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "again, Hi"},
        {"role": "assistant", "content": "Hi"},
    ],
]


@functools.cache
def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def qwen(shared):
    return load_tokenizer(str(shared / "assets/qwen2-tokenizer"))  # shared: never modify it in a test


def runs(tok, ids, mask) -> list[tuple[int, str]]:
    out = []
    for flag, group in itertools.groupby(zip(ids, mask, strict=True), key=lambda x: x[1]):
        out.append((flag, tok.decode([i for i, _ in group])))
    return out


def test_qwen3_template_masks_only_replies(qwen):
    conv = CONVERSATIONS[1]
    ids, mask = render_chat(qwen, conv)
    assert not has_generation_tags(qwen)
    assert ids == list(qwen.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    replies = [text for flag, text in runs(qwen, ids, mask) if flag]
    # Qwen3 renders earlier replies plainly and writes an (empty) think block before the last one
    assert replies == ["4<|im_end|>", "<think>\n\n</think>\n\n6, of course.<|im_end|>"]
    prompt_text = "".join(text for flag, text in runs(qwen, ids, mask) if not flag)
    assert "2+2?" in prompt_text and "And 3+3?" in prompt_text and "Be brief." in prompt_text
    assert "6, of course" not in prompt_text


def test_search_agrees_with_generation_tags(qwen):
    tok = AutoTokenizer.from_pretrained(qwen.name_or_path)
    tok.chat_template = CHATML_GEN
    assert has_generation_tags(tok)
    for conv in CONVERSATIONS:
        by_tags = render_chat(tok, conv, method="generation")
        by_search = render_chat(tok, conv, method="search")
        assert by_tags == by_search
        assert sum(by_tags[1]) > 0
    ids, mask = render_chat(tok, CONVERSATIONS[2])  # replies equal to words in the prompts
    assert [t for f, t in runs(tok, ids, mask) if f] == ["Hi<|im_end|>", "Hi<|im_end|>"]


def test_slow_tokenizer_path_matches_offsets(qwen):
    class NoOffsets:  # the same tokenizer seen as one without offset mappings
        is_fast = False

        def __getattr__(self, name):
            return getattr(qwen, name)

        def __call__(self, *a, **kw):
            return qwen(*a, **kw)

    for conv in CONVERSATIONS:
        assert render_chat(NoOffsets(), conv, method="search") == render_chat(qwen, conv, method="search")


def test_errors(qwen):
    tok = AutoTokenizer.from_pretrained(qwen.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(DataError, match="does not appear verbatim"):
        render_chat(tok, CONVERSATIONS[0])
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        render_chat(tok, CONVERSATIONS[0])
    with pytest.raises(DataError, match="method must be"):
        render_chat(qwen, CONVERSATIONS[0], method="diff")
