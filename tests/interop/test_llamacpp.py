"""llama.cpp interop: a tiny student exported for llama.cpp converts with its `convert_hf_to_gguf.py`
(architecture `arwkv7`), and the GGUF's metadata and every tensor match the export.

The converter run needs a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/) named by
`ARWKV_LLAMACPP_DIR`; without it those tests skip. The tree is not part of the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from arwkv.errors import CheckpointError
from arwkv.interop.llamacpp import (
    check_gguf,
    convert_to_gguf,
    export_for_llamacpp,
    llamacpp_problems,
)
from arwkv.interop.rwkv_hybrid import export_rwkv_hybrid
from arwkv.models.arwkv import ArwkvConfig, ArwkvForCausalLM

QWEN_VOCAB = 151936  # Qwen2.5's padded vocabulary: every id of the shared tokenizer (max 151668) is below it
LLAMACPP = Path(os.environ.get("ARWKV_LLAMACPP_DIR", ""))


def _student(
    gate: bool, group_norm: bool, softmax_layers=None, seed: int = 0, ranks: dict | None = None
) -> ArwkvForCausalLM:
    from transformers import Qwen2Config

    teacher = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=QWEN_VOCAB,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ).to_dict()
    cfg = ArwkvConfig(
        teacher_config=teacher,
        head_size=64,
        use_gate=gate,
        use_group_norm=group_norm,
        lora_ranks=ranks or {"w": 64, "a": 64, "v": 32, "g": 128},
        softmax_layers=softmax_layers,
    )
    torch.manual_seed(seed)
    model = ArwkvForCausalLM(cfg)
    with torch.no_grad():  # random everywhere, mixers strongly, so that every branch moves the logits
        for name, p in model.named_parameters():
            p.add_((0.3 if ".self_attn." in name else 0.05) * torch.randn_like(p))
    return model.eval()


def _tokenizer(shared: Path) -> Path:
    return shared / "assets" / "qwen2-tokenizer"


needs_llamacpp = pytest.mark.skipif(
    not (LLAMACPP / "convert_hf_to_gguf.py").is_file(),
    reason="set ARWKV_LLAMACPP_DIR to a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, "
    "gguf-py/); none is vendored in the repository and CI has no copy",
)


# "padded": RWKV-7's size-based ranks for C = 64 (32 each), zero-padded to llama.cpp's 64/64/32/128 on export
PADDED = {"w": 32, "a": 32, "v": 32, "g": 32}


@pytest.fixture(
    scope="module",
    params=[(True, True, None), (False, False, None), (True, True, PADDED)],
    ids=["gated+gn", "free", "padded"],
)
def converted(request, tmp_path_factory):
    """(student, GGUF file, its check report) for one mixer layout; converted once per module."""
    shared = Path(os.environ.get("ARWKV_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
    if not (shared / "assets" / "qwen2-tokenizer").is_dir():
        pytest.skip(f"the Qwen2 tokenizer is not at {shared}/assets/qwen2-tokenizer (set ARWKV_SHARED)")
    gate, group_norm, ranks = request.param
    tmp = tmp_path_factory.mktemp("llamacpp")
    student = _student(gate, group_norm, ranks=ranks)
    export = export_for_llamacpp(student, tmp / "export", _tokenizer(shared))
    gguf = convert_to_gguf(export, tmp / "model.gguf", LLAMACPP, outtype="f32")
    return student, gguf, check_gguf(gguf, source=export)


@needs_llamacpp
@pytest.mark.slow
def test_llamacpp_converts_the_export(converted, tmp_path: Path) -> None:
    student, _, report = converted
    gate, group_norm = student.config.use_gate, student.config.use_group_norm
    L = 2
    per_layer = 5 + 1 + 9 + 3 + 4 + (2 if gate else 0) + (2 if group_norm else 0)
    assert len(report.tensors) == 3 + L * per_layer
    assert sorted(report.compared) == sorted(report.tensors)  # every tensor equals the export, bit for bit
    meta = report.metadata
    assert meta["general.architecture"] == "arwkv7"
    assert meta["arwkv7.block_count"] == L and meta["arwkv7.embedding_length"] == 64
    assert meta["arwkv7.wkv.head_size"] == 64 and meta["arwkv7.feed_forward_length"] == 96
    assert meta["arwkv7.attention.gate_lora_rank"] == (128 if gate else 0)
    assert meta["arwkv7.attention.layer_norm_rms_epsilon"] == pytest.approx(student.config.rms_norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.eos_token_id"] == 151645
    # the token-shift mixes are fused in r, w, k, v, a(, g) order: spot-check against the student itself
    fused = next(t for t in report.reader.tensors if t.name == "blk.1.time_mix_lerp_fused.weight")
    mixes = np.asarray(fused.data).reshape(-1, 64)
    attn = student.model.layers[1].self_attn
    for row, m in zip(mixes, "rwkvag", strict=False):
        np.testing.assert_array_equal(row, getattr(attn, f"x_{m}").detach().reshape(-1).numpy())

    # the check is not vacuous: against another student's export, the tensors differ
    other = export_rwkv_hybrid(_student(gate, group_norm, seed=1), tmp_path / "other", untie=True)
    with pytest.raises(CheckpointError, match="differs from the source"):
        check_gguf(report.reader, source=other)


@needs_llamacpp
@pytest.mark.slow
def test_llamacpp_runs_the_gguf_like_arwkv(converted) -> None:
    """llama.cpp's own arwkv7 graph on the GGUF gives arwkv's logits, in one batch and token by token.
    Needs llama.cpp's Python bindings (`llama_cpp`, from llama-cpp-python) with a library that has arwkv7."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (bindings, libllama) not installed")
    student, gguf, _ = converted
    ids = [9707, 1879, 0, 151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645]  # "Hello world!" + chat
    with torch.no_grad():
        ref = student(torch.tensor([ids])).logits[0].numpy()
    for batch in (64, 1):  # whole prompt at once, then the recurrent path one token at a time
        llm = llama_cpp.Llama(
            model_path=str(gguf),
            logits_all=True,
            n_ctx=64,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=1,
            verbose=False,
        )
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        llm.close()


def test_llamacpp_export_refuses_softmax_layers(tmp_path: Path, shared: Path) -> None:
    student = _student(True, False, softmax_layers=[1])
    assert any("llama.cpp's arwkv7 has RWKV mixers in every layer" in p for p in llamacpp_problems(student))
    with pytest.raises(CheckpointError, match="softmax_layers"):
        export_for_llamacpp(student, tmp_path, _tokenizer(shared))


def test_check_gguf_rejects_other_architectures(tmp_path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="general.architecture is 'llama', expected 'arwkv7'"):
        check_gguf(tmp_path / "llama.gguf")


def test_check_gguf_names_missing_tensors(tmp_path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "half.gguf"), "arwkv7")
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 96)):
        writer.add_uint32(f"arwkv7.{key}", value)
    writer.add_uint32("arwkv7.wkv.head_size", 64)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as e:
        check_gguf(tmp_path / "half.gguf")
    msg = str(e.value)
    assert "missing tensors" in msg and "blk.0.time_mix_lerp_fused.weight" in msg
    assert "arwkv7.attention.decay_lora_rank = None, expected 64" in msg
