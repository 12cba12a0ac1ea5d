"""A stand-in for llama.cpp's `convert_hf_to_gguf.py`, for tests of `arwkv export --to gguf` on machines
without a llama.cpp checkout (point ARWKV_LLAMACPP_DIR at this folder).

It writes the `arwkv7` GGUF that arwkv's own mapping (`arwkv.interop.llamacpp`) says the real converter
writes, so it checks the export verb's plumbing (arguments, dtypes, the check of the written file, OUT
handling), not llama.cpp: `tests/interop/test_llamacpp.py` runs the real converter when one is present.
Usage as the real one: convert_hf_to_gguf.py SRC --outfile FILE --outtype f32|f16|bf16|q8_0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np

from arwkv.interop.llamacpp import ARCH, _hybrid_source, expected_gguf_tensors
from arwkv.interop.rwkv_hybrid import LORA_RANKS, HybridLayout, read_config, read_state_dict

QTYPES = {
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def tokens(src: Path, vocab: int) -> list[str]:
    data = json.loads((src / "tokenizer.json").read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    by_id |= {t["id"]: t["content"] for t in data["added_tokens"]}
    return [by_id.get(i, f"[PAD{i}]") for i in range(vocab)]  # padded like the real converter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("--outfile", type=Path, required=True)
    ap.add_argument("--outtype", default="f32")
    args = ap.parse_args()
    layout = HybridLayout.from_config(read_config(args.src))
    sd = read_state_dict(args.src)
    w = gguf.GGUFWriter(str(args.outfile), ARCH)
    for key, value in (
        ("block_count", layout.layers),
        ("embedding_length", layout.hidden),
        ("feed_forward_length", layout.intermediate),
        ("wkv.head_size", layout.head_size),
        ("attention.decay_lora_rank", LORA_RANKS["w"]),
        ("attention.iclr_lora_rank", LORA_RANKS["a"]),
        ("attention.value_residual_mix_lora_rank", LORA_RANKS["v"]),
        ("attention.gate_lora_rank", LORA_RANKS["g"] if layout.gate else 0),
        ("token_shift_count", 1),
    ):
        w.add_uint32(f"{ARCH}.{key}", value)
    w.add_token_list(tokens(args.src, layout.vocab))
    template = args.src / "chat_template.jinja"
    if template.is_file():
        w.add_chat_template(template.read_text())
    qtype = QTYPES.get(args.outtype)
    for name in expected_gguf_tensors(layout):
        x = _hybrid_source(name, sd, layout).astype(np.float32)
        # like llama.cpp: vectors stay f32; rows that are not whole quantization blocks stay unquantized
        if qtype is None or x.ndim < 2 or x.shape[-1] % 32:
            w.add_tensor(name, x)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)  # shape from the bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
