"""Preference pairs for DPO: jsonl formats (chat template, plain text, token ids), the completion mask, bad
input as one clear DataError naming file and line, and the data-free set (teacher greedy = chosen, student
greedy = rejected) with its cache."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoTokenizer

from arwkv.data import preferences as prefs
from arwkv.data.preferences import data_free_preferences, load_preferences
from arwkv.errors import DataError

STORIES = "assets/llama2c-stories260K/stories260K.bin"


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@functools.cache
def _qwen(folder: str):
    return AutoTokenizer.from_pretrained(folder)


def test_chat_pairs_mark_only_the_reply(shared, tmp_path):
    tok = _qwen(str(shared / "assets/qwen2-tokenizer"))
    f = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering.", "rejected": "Paint."},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "2+2?"},
                ],
                "chosen": {"role": "assistant", "content": "4"},
                "rejected": "5",
            },
        ],
    )
    pairs = load_preferences([str(f)], tok, seq_len=256)
    assert len(pairs) == 2
    b = pairs.batch([0, 1])
    replies = [tok.decode(b["input_ids"][i][b["loss_mask"][i].bool()]) for i in range(4)]
    # the reply, with what the template writes around it (Qwen3's empty think block, the end of turn)
    for got, want in zip(replies, ["Rayleigh scattering.", "4", "Paint.", "5"], strict=True):
        assert f"{want}<|im_end|>" in got and "user" not in got and "Hello" not in got, got
    prompt0 = tok.decode(b["input_ids"][0][: int(pairs.chosen_prompt[0])])
    assert prompt0.endswith("<|im_start|>assistant\n") and "Why is the sky blue?" in prompt0
    assert "Hello!" in tok.decode(b["input_ids"][1][: int(pairs.chosen_prompt[1])])  # history is prompt


def test_token_id_pairs_without_tokenizer(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"prompt": [1, 5], "chosen": [7, 8, 9], "rejected": [4]}, ""])
    pairs = load_preferences(str(f), None, seq_len=4, vocab=16)
    b = pairs.batch([0])
    assert b["input_ids"].tolist() == [[1, 5, 7, 8], [1, 5, 4, 0]]  # chosen cut to the context of 4
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert pairs.meta["truncated"] == 1


def test_plain_text_pairs_end_with_eos(shared, tmp_path):
    tok = AutoTokenizer.from_pretrained(shared / "assets/qwen2-tokenizer")
    tok.chat_template = None  # a base model's tokenizer: plain text
    f = _write(tmp_path / "p.jsonl", [{"prompt": "Once upon", "chosen": " a time", "rejected": " the end"}])
    pairs = load_preferences([str(f)], tok, seq_len=64)
    ids = pairs.chosen[0, : int(pairs.chosen_len[0])].tolist()
    p = int(pairs.chosen_prompt[0])
    assert tok.decode(ids[:p]) == "Once upon" and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[p:-1]) == " a time"


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        (
            {"prompt": [1, 2], "chosen": [3]},
            ["p.jsonl:2", "missing field 'rejected'", "prompt, chosen and rejected"],
        ),
        ({"chosen": [3], "rejected": [4]}, ["p.jsonl:2", "missing field 'prompt'"]),
        ({"prompt": [1, 2], "chosen": [], "rejected": [4]}, ["p.jsonl:2", "'chosen' is empty"]),
        (
            {"prompt": list(range(1, 9)), "chosen": [3], "rejected": [4]},
            ["p.jsonl:2", "prompt is 8 tokens", "dpo.seq_len=8"],
        ),
        ("{not json", ["p.jsonl:2", "not valid JSON"]),
        ({"prompt": "text", "chosen": [3], "rejected": [4]}, ["p.jsonl:2", "list of token ids"]),
        ({"prompt": [1, 99], "chosen": [3], "rejected": [4]}, ["p.jsonl:2", "outside the vocabulary"]),
    ],
)
def test_bad_token_pairs_are_one_clear_line(tmp_path, line, needles):
    good = {"prompt": [1, 2], "chosen": [3], "rejected": [4]}
    f = _write(tmp_path / "p.jsonl", [good, line])
    with pytest.raises(DataError) as e:
        load_preferences([str(f)], None, seq_len=8, vocab=16)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_bad_chat_pairs_are_one_clear_line(shared, tmp_path):
    tok = _qwen(str(shared / "assets/qwen2-tokenizer"))
    f = _write(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "  ", "rejected": "Yo"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: 'chosen' is empty"):
        load_preferences([str(f)], tok, seq_len=64)
    f = _write(tmp_path / "p.jsonl", [{"prompt": "word " * 50, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: the prompt is \d+ tokens, not shorter than the context"):
        load_preferences([str(f)], tok, seq_len=32)
    with pytest.raises(DataError, match="does not exist"):
        load_preferences([str(tmp_path / "nope.jsonl")], tok)


def test_split_holds_out_pairs_never_trained_on(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"prompt": [1, i], "chosen": [3], "rejected": [4]} for i in range(10)])
    pairs = load_preferences([str(f)], None, seq_len=8)
    train, held = pairs.split(3, seed=0)
    seen = {tuple(r[:2].tolist()) for r in train.chosen} | {tuple(r[:2].tolist()) for r in held.chosen}
    assert len(train) == 7 and len(held) == 3 and len(seen) == 10
    with pytest.raises(DataError, match="lower dpo.heldout_pairs"):
        pairs.split(10)


# ------------------------------------------------------------------------------------------- data-free


@functools.cache
def _stories_pair(path: str):
    from arwkv.convert.build import build_student
    from arwkv.convert.llama2c import load_llama2c

    teacher = load_llama2c(path)
    torch.manual_seed(0)
    return teacher.eval(), build_student(teacher, init="copy", use_group_norm=True).eval()


def _greedy(model, prompt, n):
    """Naive greedy continuation: a full forward pass per new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_data_free_pairs_are_teacher_greedy_over_student_greedy(shared, tmp_path, monkeypatch):
    teacher, student = _stories_pair(str(shared / STORIES))
    calls = []
    real = prefs._make_split
    monkeypatch.setattr(prefs, "_make_split", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    kw = dict(num_pairs=6, num_heldout=3, prompt_min=2, prompt_max=6, reply_len=8, batch_size=4)
    train, held = data_free_preferences(teacher, student, None, cache_dir=tmp_path, progress=False, **kw)
    assert calls == [6, 3] and train.meta["mode"] == "bos"
    assert len(train) + train.meta["dropped_identical"] == 6 and len(held) >= 1
    for i in range(len(train)):
        p = int(train.chosen_prompt[i])
        prompt = train.chosen[i, :p].tolist()
        assert prompt[0] == 1 and 3 <= p <= 7  # BOS + 2..6 teacher-written tokens
        assert torch.equal(train.rejected[i, :p], train.chosen[i, :p])  # same prompt on both sides
        assert train.chosen[i, p : int(train.chosen_len[i])].tolist() == _greedy(teacher, prompt, 8)
        assert train.rejected[i, p : int(train.rejected_len[i])].tolist() == _greedy(student, prompt, 8)
    held_prompts = {tuple(held.chosen[i, : int(held.chosen_prompt[i])].tolist()) for i in range(len(held))}
    train_prompts = {
        tuple(train.chosen[i, : int(train.chosen_prompt[i])].tolist()) for i in range(len(train))
    }
    assert not held_prompts & train_prompts  # other seed, other prompts
    # made once: the second call reads the cache; another student is another key
    calls.clear()
    again, held2 = data_free_preferences(teacher, student, None, cache_dir=tmp_path, progress=False, **kw)
    assert calls == [] and again.fingerprint == train.fingerprint and held2.fingerprint == held.fingerprint
    assert [p.name.startswith("preferences-") for p in tmp_path.iterdir()] == [True]
    other = _stories_pair.__wrapped__(str(shared / STORIES))[1]
    with torch.no_grad():
        other.lm_head.weight.add_(0.01)
    data_free_preferences(teacher, other, None, cache_dir=tmp_path, progress=False, **kw)
    assert calls == [6, 3] and len(list(tmp_path.iterdir())) == 2


def test_data_free_chat_pairs_use_the_chat_template(shared):
    from transformers import LlamaConfig, LlamaForCausalLM

    from arwkv.convert.build import build_student
    from arwkv.data.teacher_corpus import DEFAULT_PROMPTS

    tok = _qwen(str(shared / "assets/qwen2-tokenizer"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    teacher = LlamaForCausalLM(cfg).eval()
    student = build_student(teacher, init="copy").eval()
    train, held = data_free_preferences(
        teacher, student, tok, num_pairs=3, num_heldout=0, reply_len=5, batch_size=3, progress=False
    )
    assert held is None and train.meta["mode"] == "chat" and len(train) >= 1
    for i in range(len(train)):
        p = int(train.chosen_prompt[i])
        prompt = tok.decode(train.chosen[i, :p])
        assert prompt.endswith("<|im_start|>assistant\n") and any(q in prompt for q in DEFAULT_PROMPTS)
        assert 1 <= int(train.chosen_len[i]) - p <= 5 and 1 <= int(train.rejected_len[i]) - p <= 5
