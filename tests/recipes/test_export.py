"""`arwkv export` (arwkv.recipes.export) on tiny students shaped like the shipped recipes' teachers.

GGUF runs through a stand-in for llama.cpp's converter (`fake_llamacpp/`, arwkv's own tensor map) so that the
verb's plumbing is tested everywhere; `tests/interop/test_llamacpp.py` runs the real converter and llama.cpp's
runtime when ARWKV_LLAMACPP_DIR names a checkout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arwkv.cli import main
from arwkv.convert.build import build_student
from arwkv.convert.families import tiny_teacher
from arwkv.errors import CheckpointError, ConfigError
from arwkv.interop.llamacpp import check_gguf
from arwkv.interop.rwkv_hybrid import LORA_RANKS, load_rwkv_hybrid, student_ranks
from arwkv.models.arwkv import ArwkvForCausalLM
from arwkv.recipes.export import run_export

FAKE_LLAMACPP = Path(__file__).parent / "fake_llamacpp"
CHAT = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


@pytest.fixture(autouse=True)
def _no_llamacpp(monkeypatch):
    monkeypatch.delenv("ARWKV_LLAMACPP_DIR", raising=False)


@pytest.fixture
def fake_llamacpp(monkeypatch) -> Path:
    monkeypatch.setenv("ARWKV_LLAMACPP_DIR", str(FAKE_LLAMACPP))
    return FAKE_LLAMACPP


def save_tokenizer(folder: Path, vocab: int) -> Path:
    """A word-level tokenizer with a chat template; every id is below `vocab` (the last rows stay unused)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(vocab - 13)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT
    fast.save_pretrained(folder)
    return folder


def _random_mixers(student: ArwkvForCausalLM) -> ArwkvForCausalLM:
    with torch.no_grad():  # copy init leaves LoRAs and token-shift mixes at 0: make every branch count
        for name, p in student.named_parameters():
            if ".self_attn." in name:
                p.add_(0.2 * torch.randn_like(p))
    return student.eval()


def stories_student(**mixer) -> ArwkvForCausalLM:
    """stories260K's shape (dim 64, 8 heads / 4 KV heads of 8, hidden 172, vocab 512, tied), 2 layers."""
    teacher = tiny_teacher(
        "llama",
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=512,
    )
    return _random_mixers(build_student(teacher, init="copy", untie_embeddings=True, **mixer))


def smol_student(**mixer) -> ArwkvForCausalLM:
    """SmolLM2-135M's shape (heads of 64, 3:1 GQA, tied embeddings), narrower; default mixer options."""
    teacher = tiny_teacher(
        "llama",
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=256,
    )
    return _random_mixers(build_student(teacher, init="copy", untie_embeddings=True, **mixer))


def save_run(tmp_path: Path, student: ArwkvForCausalLM, tokenizer: bool) -> Path:
    """A run folder as `arwkv convert` leaves it: config.yaml and final/ (student + tokenizer)."""
    run = tmp_path / "run"
    student.save_pretrained(run / "final")
    if tokenizer:
        save_tokenizer(run / "final", student.config.vocab_size)
    (run / "config.yaml").write_text("name: test\n")
    return run


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def qwen_student() -> ArwkvForCausalLM:
    """Qwen2.5-7B's head layout (heads of 128 with q/k/v biases, 7:1 GQA), narrower, with the student options
    of the shipped qwen2.5-7b recipe (heads of 64, biases dropped, llama.cpp's ranks)."""
    from arwkv.config import load_recipe

    teacher = tiny_teacher(
        "qwen2",
        hidden_size=256,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        vocab_size=256,
    )
    mixer = {k: v for k, v in load_recipe("qwen2.5-7b").student.mixer.items() if k != "wkv_backend"}
    return _random_mixers(build_student(teacher, init="copy", untie_embeddings=True, **mixer))


SHAPES = {
    "stories260k": (lambda: stories_student(head_size=64), False),
    "smollm2": (smol_student, True),
    "qwen2.5": (qwen_student, True),
}


@pytest.mark.parametrize("to", ["hf", "rwkv_hybrid", "gguf"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_each_format_from_a_run_folder(tmp_path, fake_llamacpp, shape, to) -> None:
    make, has_tokenizer = SHAPES[shape]
    student = make()
    run = save_run(tmp_path, student, tokenizer=has_tokenizer)
    # stories260K has no tokenizer of its own; GGUF needs one
    tok = None if has_tokenizer or to != "gguf" else save_tokenizer(tmp_path / "tok", 512)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    result = run_export(run, to, out, tokenizer=tok)
    assert result.out == out and out.exists() and not list(tmp_path.glob(".out*partial*"))
    text = "\n".join(result.notes)
    if to != "hf" and shape != "qwen2.5":  # default (size-based) ranks are below the format's: padded
        assert student_ranks(student) != LORA_RANKS and "zero-padded" in text
    if to == "gguf":
        report = check_gguf(out, source=None)
        assert report.metadata["arwkv7.block_count"] == 2
        assert len(report.metadata["tokenizer.ggml.tokens"]) == student.config.vocab_size
        assert report.metadata["tokenizer.chat_template"] == CHAT
        assert "bit-identical to the export" in text and "not compared" in text  # no llama.cpp runtime here
        return
    reloaded = ArwkvForCausalLM.from_pretrained(out) if to == "hf" else load_rwkv_hybrid(out)
    assert torch.equal(_logits(reloaded), _logits(student))  # bitwise, fp32, padded LoRAs included
    assert "bit-identical" in text
    if has_tokenizer:
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(out).chat_template == CHAT
        assert "with its chat template" in text


def test_published_checkpoint_to_hf_and_back(tmp_path) -> None:
    student = smol_student()
    save_tokenizer(tmp_path / "student", 256)
    student.save_pretrained(tmp_path / "student")
    run_export(tmp_path / "student", "rwkv_hybrid", tmp_path / "hybrid")
    run_export(tmp_path / "hybrid", "hf", tmp_path / "hf")  # a published-format folder is a source too
    again = ArwkvForCausalLM.from_pretrained(tmp_path / "hf")
    assert student_ranks(again) == LORA_RANKS  # the padded ranks stay
    assert torch.equal(_logits(again), _logits(student))


def test_rank_8_lora_is_padded_within_rounding(tmp_path) -> None:
    # exact in math; this CPU's GEMM sums x @ w1 in another order at width 8 than at 64
    student = stories_student(head_size=64, lora_ranks={"w": 8, "a": 8, "v": 8, "g": 8})
    run = save_run(tmp_path, student, tokenizer=False)
    result = run_export(run, "rwkv_hybrid", tmp_path / "out")
    assert any("rwkv_hybrid: reloaded, fp32 logits" in n for n in result.notes)
    loaded = load_rwkv_hybrid(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), _logits(student), atol=1e-4, rtol=0)


def test_dtypes(tmp_path, fake_llamacpp) -> None:
    student = smol_student()
    run = save_run(tmp_path, student, tokenizer=True)
    run_export(run, "hf", tmp_path / "bf16", "bf16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    reloaded = ArwkvForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    rounded = student.to(torch.bfloat16).float()
    assert torch.equal(_logits(reloaded), _logits(rounded))
    f16 = run_export(run, "gguf", tmp_path / "f16.gguf", "f16")
    report = check_gguf(tmp_path / "f16.gguf")
    assert "F16" in {t.tensor_type.name for t in report.reader.tensors}
    assert "blocks checked" not in "\n".join(f16.notes)  # every f16/f32 tensor equals the f16 export
    q8 = run_export(run, "gguf", tmp_path / "q8.gguf", "q8_0")
    assert "q8_0 blocks checked by name and shape" in "\n".join(q8.notes)
    with pytest.raises(ConfigError, match="q8_0 is a GGUF quantization"):
        run_export(run, "hf", tmp_path / "q8", "q8_0")
    with pytest.raises(ConfigError, match="OUT is the .gguf file"):
        run_export(run, "gguf", tmp_path / "folder")


def test_layout_llamacpp_cannot_run_lists_every_reason(tmp_path, capsys) -> None:
    # the stories260k recipe's mixer (heads of 32, twice the width, RoPE) plus a softmax layer
    student = stories_student(head_size=32, mixer_expand=2, use_rope=True, softmax_layers=[1])
    run = save_run(tmp_path, student, tokenizer=False)
    with pytest.raises(ConfigError) as e:
        run_export(run, "gguf", tmp_path / "x.gguf")
    msg = str(e.value)
    for needle in (
        "(7 problems)",
        "head size 32 (the format uses 64) -> set student.mixer.head_size=64 before training",
        "mixer width 128 != hidden_size 64 -> set student.mixer.mixer_expand=1",
        "RoPE on r/k (the format has none) -> set student.mixer.use_rope=false",
        "llama.cpp's arwkv7 has RWKV mixers in every layer -> set 'student.softmax_layers=[]'",
        "GroupNorm eps 0.00032",
        "no tokenizer",
        "ARWKV_LLAMACPP_DIR is not set",
    ):
        assert needle in msg, needle
    assert not (tmp_path / "x.gguf").exists()
    assert main(["export", str(run), "--to", "gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("[arwkv] error:") == 1 and err.count("\n  - ") == 7


def test_output_that_exists_is_refused_unless_overwrite(tmp_path) -> None:
    run = save_run(tmp_path, smol_student(), tokenizer=True)
    out = tmp_path / "out"
    run_export(run, "rwkv_hybrid", out)
    (out / "stale.txt").write_text("from before")
    with pytest.raises(ConfigError, match="out exists: pass --overwrite to replace it"):
        run_export(run, "rwkv_hybrid", out)
    run_export(run, "rwkv_hybrid", out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not an earlier export"):
        run_export(run, "hf", other, overwrite=True)
    assert (other / "mine.txt").is_file()
    with pytest.raises(ConfigError, match="is .or holds. the student being exported"):
        run_export(run, "hf", run / "final", overwrite=True)


def test_a_failed_check_keeps_the_earlier_export(tmp_path, monkeypatch) -> None:
    import arwkv.recipes.export as export

    run = save_run(tmp_path, smol_student(), tokenizer=True)
    out = tmp_path / "out"
    run_export(run, "hf", out)
    before = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise CheckpointError("hf: reloaded logits differ from the student's")

    monkeypatch.setattr(export, "_same_logits", broken)
    with pytest.raises(CheckpointError, match="reloaded logits differ"):
        run_export(run, "hf", out, "bf16", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before and not list(tmp_path.glob(".out*"))


def test_missing_converter_is_one_line(tmp_path, capsys) -> None:
    run = save_run(tmp_path, smol_student(), tokenizer=True)
    with pytest.raises(ConfigError) as e:
        run_export(run, "gguf", tmp_path / "x.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "set ARWKV_LLAMACPP_DIR to a llama.cpp source checkout" in msg
    assert "git clone --depth 1 https://github.com/ggml-org/llama.cpp" in msg
    assert main(["export", str(run), "--to", "gguf", str(tmp_path / "x.gguf"), "--check"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("[arwkv]", "  - "))]
    assert len(ours) == 1 and "converter was not found" in ours[0]  # transformers' progress bars aside


def test_converter_dir_without_the_script(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ARWKV_LLAMACPP_DIR", str(tmp_path))
    run = save_run(tmp_path, smol_student(), tokenizer=True)
    with pytest.raises(ConfigError, match=f"no convert_hf_to_gguf.py in {tmp_path}"):
        run_export(run, "gguf", tmp_path / "x.gguf", check=True)


def test_check_only_reports(tmp_path, fake_llamacpp, capsys) -> None:
    run = save_run(tmp_path, smol_student(), tokenizer=True)
    out = tmp_path / "x.gguf"
    assert main(["export", str(run), "--to", "gguf", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "the layout fits gguf" in printed and "zero-padded" in printed and not out.exists()
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "exported:" in capsys.readouterr().out


def _config_folder(folder: Path, config) -> Path:
    config.save_pretrained(folder)  # config.json only: a recipe check reads no weights
    return folder


def test_recipe_check_before_training(tmp_path, fake_llamacpp, shared) -> None:
    from transformers import LlamaConfig, Qwen2Config

    smol = _config_folder(  # SmolLM2-135M-Instruct's config (the layout is built on the meta device)
        tmp_path / "smollm2",
        LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
        ),
    )
    save_tokenizer(smol, 512)
    for recipe in ("smollm2-135m", "smollm2-135m-long"):
        for to in ("gguf", "rwkv_hybrid"):
            result = run_export(recipe, to, check=True, overrides=[f"teacher.path={smol}"])
            assert result.notes == [f"recipe {recipe}: the layout fits {to}"]  # default ranks = the format's
    with pytest.raises(ConfigError, match="local_window 64: .* -> set student.mixer.local_window=0"):
        run_export("smollm2-135m-local", "gguf", check=True, overrides=[f"teacher.path={smol}"])

    qwen25_7b = dict(  # Qwen2.5-7B-Instruct's config
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    qwen = _config_folder(tmp_path / "qwen", Qwen2Config(**qwen25_7b))
    qwen_tok = save_tokenizer(_config_folder(tmp_path / "qwen_tok", Qwen2Config(**qwen25_7b)), 512)
    for to in ("gguf", "rwkv_hybrid"):  # the shipped Qwen recipe exports without overrides
        result = run_export("qwen2.5-7b", to, check=True, overrides=[f"teacher.path={qwen_tok}"])
        assert result.notes == [f"recipe qwen2.5-7b: the layout fits {to}"]
    with pytest.raises(ConfigError) as e:  # RADLADS's layout is the opt-in one, and says why it cannot
        run_export("qwen2.5-7b-radlads", "gguf", check=True, overrides=[f"teacher.path={qwen}"])
    msg = str(e.value)
    for needle in (
        "(5 problems)",
        "head size 128 (the format uses 64) -> set student.mixer.head_size=64",
        "biases on receptance/key/value/output",
        "set student.mixer.rkv_bias=false student.mixer.output_bias=false",
        "LoRA ranks {'w': 160, 'a': 160, 'v': 96, 'g': 288}",
        "'student.mixer.lora_ranks={w: 64, a: 64, v: 32, g: 128}'",
        "GroupNorm eps 0.00128",
        "no tokenizer",
    ):
        assert needle in msg, needle

    stories = shared / "assets" / "llama2c-stories260K" / "stories260K.bin"
    with pytest.raises(ConfigError) as e:
        run_export("stories260k", "rwkv_hybrid", check=True, overrides=[f"teacher.path={stories}"])
    assert "(3 problems)" in str(e.value) and "use_rope=false" in str(e.value)
    with pytest.raises(ConfigError, match="is a recipe, not a trained student"):
        run_export("stories260k", "hf", tmp_path / "x", overrides=[f"teacher.path={stories}"])


def test_sources_that_are_not_students(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no student"):
        run_export(tmp_path / "empty", "hf", tmp_path / "x")
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "config.yaml").write_text("name: x\n")
    with pytest.raises(CheckpointError, match="the run has not finished"):
        run_export(tmp_path / "running", "hf", tmp_path / "x")
    tiny_teacher("llama").save_pretrained(tmp_path / "teacher")
    with pytest.raises(CheckpointError, match="is a llama model, not an arwkv student"):
        run_export(tmp_path / "teacher", "hf", tmp_path / "x")
    with pytest.raises(CheckpointError, match="neither a folder .* nor a recipe"):
        run_export(tmp_path / "nowhere", "hf", tmp_path / "x")
    assert not (tmp_path / "x").exists()
