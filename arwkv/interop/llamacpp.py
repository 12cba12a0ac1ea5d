"""llama.cpp interop: export a student for llama.cpp's converter and check the GGUF it writes.

RWKV-7 students: llama.cpp reads the published ARWKV layout (`RwkvHybridForCausalLM` → GGUF architecture
`arwkv7`) through its `convert_hf_to_gguf.py`. Its `arwkv7` graph has RWKV-7 mixers in every layer (no softmax
layers), LoRA ranks 64/64/32/128 (gate rank 0 when gate-free), GroupNorm eps fixed at 64e-5 and the gate
without "1 +".

RWKV-6 students of the `qrwkv` form: llama.cpp reads QRWKV6's layout (`RWKV6Qwen2ForCausalLM` → `rwkv6qwen2`):
Qwen2 names (`self_attn.q_proj/k_proj/v_proj/o_proj`, biases allowed), BlinkDL's `time_maa_*` / `time_decay*`
mixer tensors with the five token-shift LoRA blocks in the order r, k, v, w, g, a full-width `gate`, no bonus
and no GroupNorm, any LoRA ranks (`lora_rank_tokenshift`, `lora_rank_decay`).

The converter also needs the tokenizer files beside the weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from arwkv.errors import ArwkvError, CheckpointError
from arwkv.interop.rwkv_hybrid import (
    LORA_RANKS,
    MIXER,
    HybridLayout,
    LayoutProblem,
    export_rwkv_hybrid,
    layout_problems,
    read_config,
    read_state_dict,
    write_checkpoint,
)
from arwkv.models.arwkv.modeling_arwkv import MIX6, default_lora_ranks6

if TYPE_CHECKING:
    from arwkv.models.arwkv import ArwkvForCausalLM

ARCH = "arwkv7"
ARCH6 = "rwkv6qwen2"
QRWKV6_MIX_ORDER = "rkvwg"  # the five token-shift LoRA blocks of time_maa_w1/w2 in RWKV6Qwen2 checkpoints
LLAMACPP_GN_EPS = 64e-5  # hard-coded in llama.cpp's rwkv7 graph
LERP_ORDER = "rwkvag"  # order of the six token-shift mixes in time_mix_lerp_fused


def llamacpp_problems(student: ArwkvForCausalLM) -> list[str]:
    """Everything that keeps llama.cpp's `arwkv7` from running this student exactly (empty = it fits)."""
    return [str(p) for p in llamacpp_layout_problems(student)]


def llamacpp_layout_problems(student: ArwkvForCausalLM) -> list[LayoutProblem]:
    """`llamacpp_problems` with the student option that avoids each one."""
    cfg = student.config
    if getattr(cfg, "version", 7) == 6:
        return rwkv6qwen2_layout_problems(student)
    problems = layout_problems(student)
    if cfg.softmax_layers:  # supersedes the format's own softmax-layer problems
        problems = [p for p in problems if "softmax_layers=[]" not in p.options]
        problems.append(
            LayoutProblem(
                f"softmax_layers {cfg.softmax_layers}: llama.cpp's arwkv7 has RWKV mixers in every layer",
                ("softmax_layers=[]",),
            )
        )
    if cfg.use_group_norm and abs(_student_gn_eps(cfg) - LLAMACPP_GN_EPS) > 1e-12:
        problems.append(
            LayoutProblem(
                f"GroupNorm eps {_student_gn_eps(cfg):g}: llama.cpp fixes it at {LLAMACPP_GN_EPS:g} "
                "(1e-5 x head size 64)",
                ("head_size=64",),
            )
        )
    return problems


def rwkv6qwen2_layout_problems(student: ArwkvForCausalLM) -> list[LayoutProblem]:
    """What keeps llama.cpp's `rwkv6qwen2` graph from running this RWKV-6 student exactly."""
    cfg = student.config
    found = []

    def need(ok: bool, what: str, option: str) -> None:
        if not ok:
            found.append(LayoutProblem(what, (option,)))

    need(
        getattr(cfg, "rwkv6_variant", "finch") == "qrwkv",
        "RWKV-6 mixers of the finch form (bonus u, GroupNorm, SiLU gate): llama.cpp's rwkv6qwen2 runs the "
        "QRWKV6 form",
        "rwkv6_variant=qrwkv",
    )
    need(
        not cfg.softmax_layers,
        f"softmax_layers {cfg.softmax_layers}: rwkv6qwen2 has RWKV mixers in every layer",
        "softmax_layers=[]",
    )
    need(not cfg.local_window, "a local attention branch: rwkv6qwen2 has none", "local_window=0")
    need(not cfg.use_rope, "RoPE on r and k: rwkv6qwen2 has none", "use_rope=false")
    need(not cfg.use_qk_norm, "q/k norms on r and k: rwkv6qwen2 has none", "use_qk_norm=false")
    need(bool(cfg.use_gate), "no output gate: rwkv6qwen2's gate is always there", "use_gate=true")
    need(not cfg.output_bias, "a bias on the mixer output: rwkv6qwen2 has none", "output_bias=false")
    need(
        cfg.mixer_dim == cfg.hidden_size,
        f"mixer width {cfg.mixer_dim} != hidden size {cfg.hidden_size}: rwkv6qwen2 mixes at the hidden size",
        "mixer_expand=1",
    )
    return found


def _student_gn_eps(cfg: Any) -> float:
    eps = getattr(cfg, "group_norm_eps", None)
    return float(eps) if eps is not None else 1e-5 * cfg.wkv_head_size


def export_for_llamacpp(
    student: ArwkvForCausalLM, out: str | Path, tokenizer: Any, dtype: torch.dtype | None = None
) -> Path:
    """Write `out` so that `convert_hf_to_gguf.py out` makes an `arwkv7` GGUF: the rwkv_hybrid export plus the
    tokenizer (a directory holding tokenizer files, or a transformers tokenizer), weights in `dtype`."""
    if getattr(student.config, "version", 7) == 6:
        return export_rwkv6qwen2(student, out, tokenizer, dtype)
    problems = llamacpp_problems(student)
    if problems:
        raise CheckpointError(
            f"this student cannot be exported for llama.cpp's {ARCH}: " + "; ".join(problems)
        )
    # arwkv7 requires output.weight even for tied embeddings
    return export_rwkv_hybrid(student, out, tokenizer=tokenizer, untie=True, dtype=dtype)


def rwkv6qwen2_tensors(student: ArwkvForCausalLM) -> dict[str, torch.Tensor]:
    """The student's tensors under RWKV6Qwen2ForCausalLM's names (what llama.cpp's converter reads)."""
    cfg = student.config
    sd = student.state_dict()
    out = {k: v for k, v in sd.items() if ".self_attn." not in k}
    out.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])  # rwkv6qwen2 wants output.weight
    rename = {"receptance": "q_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "gate": "gate"}
    order = [MIX6.index(m) for m in QRWKV6_MIX_ORDER]
    C = cfg.hidden_size
    rank = {**default_lora_ranks6(C), **cfg.lora_ranks}["mix"]
    for i in range(cfg.num_hidden_layers):
        t = f"model.layers.{i}.self_attn."
        for name, tensor in sd.items():
            if not name.startswith(t):
                continue
            short = name.removeprefix(t)
            module, _, kind = short.partition(".")
            if module in rename:
                out[t + rename[module] + "." + kind] = tensor
            elif short == "time_maa_w1":  # [C, 5 R]: blocks reordered from arwkv's w,k,v,r,g
                out[name] = tensor.view(C, 5, -1)[:, order].reshape(C, -1)
            elif short == "time_maa_w2":  # [5, R, C]
                out[name] = tensor[order]
            else:
                out[name] = tensor
        if not cfg.use_token_shift:  # every mix 0 (and its LoRA 0) is exactly "no token shift"
            zeros = {"time_maa_w1": (C, 5 * rank), "time_maa_w2": (5, rank, C)}
            zeros |= {f"time_maa_{m}": (1, 1, C) for m in ("x", *MIX6)}
            out |= {t + n: torch.zeros(shape) for n, shape in zeros.items()}
    return out


def rwkv6qwen2_config(student: ArwkvForCausalLM) -> dict[str, Any]:
    cfg = student.config
    heads = cfg.hidden_size // cfg.wkv_head_size
    ranks = {**default_lora_ranks6(cfg.hidden_size), **cfg.lora_ranks}
    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    return {
        "architectures": ["RWKV6Qwen2ForCausalLM"],
        "model_type": ARCH6,
        **{k: getattr(cfg, k, None) for k in keep if getattr(cfg, k, None) is not None},
        "hidden_act": cfg.teacher_config.get("hidden_act", "silu"),
        "num_attention_heads": heads,  # llama.cpp: head size = hidden / heads
        "num_key_value_heads": heads,  # the student's keys are already per query head
        "head_size": cfg.wkv_head_size,
        "lora_rank_tokenshift": ranks["mix"],
        "lora_rank_decay": ranks["w"],
        "attention_bias": bool(cfg.rkv_bias),
        "tie_word_embeddings": False,
    }


def export_rwkv6qwen2(
    student: ArwkvForCausalLM, out: str | Path, tokenizer: Any, dtype: torch.dtype | None = None
) -> Path:
    """Write `out` as an RWKV6Qwen2ForCausalLM folder (config.json, model.safetensors, tokenizer) for
    llama.cpp's `convert_hf_to_gguf.py` (architecture rwkv6qwen2)."""
    problems = [str(p) for p in rwkv6qwen2_layout_problems(student)]
    if problems:
        raise CheckpointError(
            f"this student cannot be exported for llama.cpp's {ARCH6}: " + "; ".join(problems)
        )
    tensors, cfg = rwkv6qwen2_tensors(student), rwkv6qwen2_config(student)
    return write_checkpoint(student, out, tensors, cfg, tokenizer, dtype)


CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_HINT = (
    "set ARWKV_LLAMACPP_DIR to a llama.cpp source checkout, e.g. "
    "git clone --depth 1 https://github.com/ggml-org/llama.cpp"
)


def find_converter(llamacpp_dir: str | Path | None = None) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` in `llamacpp_dir` or `$ARWKV_LLAMACPP_DIR`; a one-line error when
    absent."""
    where = str(llamacpp_dir or os.environ.get("ARWKV_LLAMACPP_DIR", ""))
    script = Path(where) / CONVERTER
    if not where or not script.is_file():
        why = f"no {CONVERTER} in {where}" if where else "ARWKV_LLAMACPP_DIR is not set"
        raise ArwkvError(f"llama.cpp's converter was not found ({why}): {CONVERTER_HINT}")
    return script


def convert_to_gguf(
    src: str | Path,
    outfile: str | Path,
    llamacpp_dir: str | Path | None = None,
    outtype: str = "f32",
    timeout: float = 900,
) -> Path:
    """Run llama.cpp's `convert_hf_to_gguf.py` (from `llamacpp_dir` or `$ARWKV_LLAMACPP_DIR`) on `src`."""
    script = find_converter(llamacpp_dir)
    cmd = [sys.executable, str(script), str(src), "--outfile", str(outfile), "--outtype", outtype]
    proc = subprocess.run(cmd, cwd=script.parent, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not Path(outfile).is_file():
        raise ArwkvError(f"llama.cpp's converter failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return Path(outfile)


# ----------------------------------------------------------------------------------------------------
# checking a GGUF


@dataclass
class GgufReport:
    """What `check_gguf` read: metadata, tensor name -> numpy shape, and the tensors compared to a source."""

    metadata: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]
    reader: Any  # the gguf.GGUFReader, for further reads
    compared: list[str] = field(default_factory=list)


def expected_gguf_tensors(layout: HybridLayout) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (GGUF `ne` reversed) that llama.cpp's converter writes for `layout`."""
    C, V, F = layout.hidden, layout.vocab, layout.intermediate
    t: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (V, C),
        "output_norm.weight": (C,),
        "output.weight": (V, C),
    }
    for i in range(layout.layers):
        b = f"blk.{i}."
        t |= {
            b + "attn_norm.weight": (C,),
            b + "ffn_norm.weight": (C,),
            b + "ffn_gate.weight": (F, C),
            b + "ffn_up.weight": (F, C),
            b + "ffn_down.weight": (C, F),
            b + "time_mix_lerp_fused.weight": (6 if layout.gate else 5, 1, 1, C),
        }
        for m, r in LORA_RANKS.items():
            if m == "g" and not layout.gate:
                continue
            # layer 0's unused v0/v1/v2 are written as copies of a0/a1/a2 (llama.cpp's loader expects that)
            r = LORA_RANKS["a"] if m == "v" and i == 0 else r
            t |= {b + f"time_mix_{m}1.weight": (r, C), b + f"time_mix_{m}2.weight": (C, r)}
            if m != "g":
                t[b + f"time_mix_{m}0.weight"] = (C,)
        t |= {b + f"time_mix_{n}.weight": (C,) for n in ("k_k", "k_a", "r_k")}
        t |= {b + f"time_mix_{n}.weight": (C, C) for n in ("key", "value", "receptance", "output")}
        if layout.group_norm:
            t |= {b + "time_mix_ln.weight": (C,), b + "time_mix_ln.bias": (C,)}
    return t


def _hybrid_source(name: str, sd: dict[str, torch.Tensor], layout: HybridLayout) -> np.ndarray:
    """The array llama.cpp's converter should write for GGUF tensor `name`, from the rwkv_hybrid weights."""
    flat = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in flat:
        key = flat[name] if flat[name] in sd else "model.embed_tokens.weight"
        return sd[key].float().numpy()
    _, i, rest = name.split(".", 2)
    p = f"model.layers.{i}."
    t = p + MIXER
    plain = {
        "attn_norm.weight": p + "input_layernorm.weight",
        "ffn_norm.weight": p + "post_attention_layernorm.weight",
        "ffn_gate.weight": p + "mlp.gate_proj.weight",
        "ffn_up.weight": p + "mlp.up_proj.weight",
        "ffn_down.weight": p + "mlp.down_proj.weight",
        "time_mix_ln.weight": t + "ln_x.weight",
        "time_mix_ln.bias": t + "ln_x.bias",
    }
    if rest in plain:
        return sd[plain[rest]].float().numpy()
    part = rest.removeprefix("time_mix_").removesuffix(".weight")
    if part == "lerp_fused":
        mixes = LERP_ORDER if layout.gate else LERP_ORDER[:-1]
        return torch.stack([sd[t + f"x_{m}"].reshape(1, 1, -1) for m in mixes]).float().numpy()
    if part in ("key", "value", "receptance", "output"):
        return sd[t + f"{part}.weight"].float().numpy()
    if i == "0" and part[0] == "v" and len(part) == 2:
        part = "a" + part[1]
    x = sd[t + part].float()
    return (x.T if part[-1] in "12" else x.reshape(-1)).numpy()


def check_gguf(path: str | Path | Any, source: str | Path | None = None, atol: float = 0.0) -> GgufReport:
    """Check that `path` (a file or an open `gguf.GGUFReader`, which takes a while to parse a 150k-token
    vocabulary) is an `arwkv7` GGUF with a complete, consistently shaped tensor list.

    With `source` (the rwkv_hybrid directory it was converted from) the metadata must match its config.json
    and every f32/f16 tensor must equal the source weights (within `atol`, e.g. 1e-3 for f16 files). Raises
    `CheckpointError` naming every problem; returns what it read."""
    from gguf import GGUFReader

    reader = path if isinstance(path, GGUFReader) else GGUFReader(str(path))
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    problems: list[str] = []
    arch = meta.get("general.architecture")
    if arch == ARCH6:
        return _check_rwkv6qwen2(path, reader, meta, tensors, source, atol)
    if arch != ARCH:
        raise CheckpointError(f"{path}: general.architecture is {arch!r}, expected {ARCH!r} or {ARCH6!r}.")
    layout = _layout_from_source(source) if source is not None else _layout_from_meta(meta, tensors)
    want_meta = {
        f"{ARCH}.block_count": layout.layers,
        f"{ARCH}.embedding_length": layout.hidden,
        f"{ARCH}.feed_forward_length": layout.intermediate,
        f"{ARCH}.wkv.head_size": layout.head_size,
        f"{ARCH}.attention.decay_lora_rank": LORA_RANKS["w"],
        f"{ARCH}.attention.iclr_lora_rank": LORA_RANKS["a"],
        f"{ARCH}.attention.value_residual_mix_lora_rank": LORA_RANKS["v"],
        f"{ARCH}.attention.gate_lora_rank": LORA_RANKS["g"] if layout.gate else 0,
        f"{ARCH}.token_shift_count": 1,
    }
    for k, v in want_meta.items():
        if meta.get(k) != v:
            problems.append(f"metadata {k} = {meta.get(k)!r}, expected {v!r}")
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    if n_tokens != layout.vocab:
        problems.append(f"tokenizer.ggml.tokens has {n_tokens} entries, expected vocab_size {layout.vocab}")
    problems += _tensor_list_problems(expected_gguf_tensors(layout), tensors)
    report = GgufReport(meta, tensors, reader)
    if source is not None and not problems:
        sd = read_state_dict(source)
        problems += _compare_to_source(report, lambda name: _hybrid_source(name, sd, layout), atol)
    if problems:
        raise CheckpointError(f"{path} is not the expected {ARCH} GGUF: " + "; ".join(problems))
    return report


def _tensor_list_problems(want: dict[str, tuple[int, ...]], tensors: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and misshapen tensors of a GGUF against the list its architecture needs."""
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    wrong = [f"{n}: {tensors[n]} (expected {s})" for n, s in want.items() if n in tensors and tensors[n] != s]
    found = (("missing tensors", missing), ("unexpected tensors", extra), ("shape mismatches", wrong))
    return [f"{len(v)} {what}: {', '.join(v[:12])}" for what, v in found if v]


def _compare_to_source(report: GgufReport, source_of: Any, atol: float) -> list[str]:
    """Every f32/f16 tensor of the GGUF against `source_of(name)` (the array the converter should write);
    quantized / bf16 blocks are checked by name and shape only (see `report.compared`)."""
    problems = []
    for t in report.reader.tensors:
        if t.tensor_type.name not in ("F32", "F16"):
            continue
        got = np.asarray(t.data, dtype=np.float32).reshape(report.tensors[t.name])
        exp = source_of(t.name)
        if not np.allclose(got, exp.reshape(got.shape), rtol=0, atol=atol):
            problems.append(f"{t.name} differs from the source (max |diff| {np.abs(got - exp).max():.3g})")
        report.compared.append(t.name)
    return problems


def _field_value(f: Any) -> Any:
    try:
        v = f.contents()
    except Exception:  # exotic field types: not needed for the checks
        return None
    return v


def _layout_from_source(source: str | Path) -> HybridLayout:
    return HybridLayout.from_config(read_config(source))


def _layout_from_meta(meta: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> HybridLayout:
    try:
        C, L = meta[f"{ARCH}.embedding_length"], meta[f"{ARCH}.block_count"]
        head = meta[f"{ARCH}.wkv.head_size"]
        ffn = meta[f"{ARCH}.feed_forward_length"]
    except KeyError as e:
        raise CheckpointError(f"the GGUF lacks metadata {e.args[0]}") from None
    vocab = tensors.get("token_embd.weight", (0, C))[0]
    gate = "blk.0.time_mix_g1.weight" in tensors
    gn = "blk.0.time_mix_ln.weight" in tensors
    return HybridLayout(
        hidden=C,
        layers=L,
        vocab=vocab,
        intermediate=ffn,
        heads=1,
        kv_heads=1,
        head_size=head,
        head_size_divisor=8,
        gate=gate,
        group_norm=gn,
        wkv_layers=tuple(range(L)),
        tie=False,
    )


# ----------------------------------------------------------------------------------------------------
# checking an rwkv6qwen2 GGUF


def expected_rwkv6qwen2_tensors(
    hidden: int, layers: int, vocab: int, ffn: int, mix_rank: int, decay_rank: int, bias: bool
) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape that llama.cpp's converter writes for an RWKV6Qwen2 folder."""
    C, V, F = hidden, vocab, ffn
    t: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (V, C),
        "output_norm.weight": (C,),
        "output.weight": (V, C),
    }
    for i in range(layers):
        b = f"blk.{i}."
        t |= {b + n: (C,) for n in ("attn_norm.weight", "ffn_norm.weight", "time_mix_lerp_x.weight")}
        t |= {b + "ffn_gate.weight": (F, C), b + "ffn_up.weight": (F, C), b + "ffn_down.weight": (C, F)}
        t |= {b + f"time_mix_{n}.weight": (C, C) for n in ("receptance", "key", "value", "output", "gate")}
        if bias:
            t |= {b + f"time_mix_{n}.bias": (C,) for n in ("receptance", "key", "value")}
        t |= {
            b + "time_mix_lerp_fused.weight": (5, 1, 1, C),
            b + "time_mix_w1.weight": (5 * mix_rank, C),
            b + "time_mix_w2.weight": (5, C, mix_rank),
            b + "time_mix_decay.weight": (C,),
            b + "time_mix_decay_w1.weight": (decay_rank, C),
            b + "time_mix_decay_w2.weight": (C, decay_rank),
        }
    return t


def rwkv6qwen2_gguf_source(name: str, sd: dict[str, torch.Tensor]) -> np.ndarray:
    """The array llama.cpp's converter should write for GGUF tensor `name`, from RWKV6Qwen2 folder weights."""
    flat = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    flat["output.weight"] = "lm_head.weight"
    if name in flat:
        return sd[flat[name]].float().numpy()
    _, i, rest = name.split(".", 2)
    p = f"model.layers.{i}."
    t = p + "self_attn."
    plain = {
        "attn_norm.weight": p + "input_layernorm.weight",
        "ffn_norm.weight": p + "post_attention_layernorm.weight",
        "ffn_gate.weight": p + "mlp.gate_proj.weight",
        "ffn_up.weight": p + "mlp.up_proj.weight",
        "ffn_down.weight": p + "mlp.down_proj.weight",
        "time_mix_gate.weight": t + "gate.weight",
    }
    proj = {"receptance": "q_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
    plain |= {
        f"time_mix_{a}.{kind}": f"{t}{b}.{kind}" for a, b in proj.items() for kind in ("weight", "bias")
    }
    if rest in plain:
        return sd[plain[rest]].float().numpy()
    gguf_order = [QRWKV6_MIX_ORDER.index(m) for m in MIX6]  # the graph reads the blocks as w, k, v, r, g
    x = {
        "time_mix_lerp_x.weight": lambda: sd[t + "time_maa_x"].reshape(-1),
        "time_mix_lerp_fused.weight": lambda: torch.stack(
            [sd[t + f"time_maa_{m}"].reshape(1, 1, -1) for m in MIX6]
        ),
        "time_mix_w1.weight": lambda: sd[t + "time_maa_w1"].T.unflatten(0, (5, -1))[gguf_order].flatten(0, 1),
        "time_mix_w2.weight": lambda: sd[t + "time_maa_w2"].permute(0, 2, 1)[gguf_order],
        "time_mix_decay.weight": lambda: sd[t + "time_decay"].reshape(-1),
        "time_mix_decay_w1.weight": lambda: sd[t + "time_decay_w1"].T,
        "time_mix_decay_w2.weight": lambda: sd[t + "time_decay_w2"].T,
    }[rest]()
    return x.float().numpy()


def _check_rwkv6qwen2(
    path: Any,
    reader: Any,
    meta: dict[str, Any],
    tensors: dict[str, tuple[int, ...]],
    source: Any,
    atol: float,
) -> GgufReport:
    problems: list[str] = []
    try:
        C, L = meta[f"{ARCH6}.embedding_length"], meta[f"{ARCH6}.block_count"]
        F, N = meta[f"{ARCH6}.feed_forward_length"], meta[f"{ARCH6}.wkv.head_size"]
        R, Rw = meta[f"{ARCH6}.time_mix_extra_dim"], meta[f"{ARCH6}.time_decay_extra_dim"]
    except KeyError as e:
        raise CheckpointError(f"{path}: the GGUF lacks metadata {e.args[0]}") from None
    V = tensors.get("token_embd.weight", (0, C))[0]
    bias = "blk.0.time_mix_key.bias" in tensors
    if source is not None:
        cfg = read_config(source)
        want = {
            "embedding_length": cfg["hidden_size"],
            "block_count": cfg["num_hidden_layers"],
            "feed_forward_length": cfg["intermediate_size"],
            "wkv.head_size": cfg["hidden_size"] // cfg["num_attention_heads"],
            "time_mix_extra_dim": cfg["lora_rank_tokenshift"],
            "time_decay_extra_dim": cfg["lora_rank_decay"],
            "attention.head_count_kv": cfg["num_key_value_heads"],
            "token_shift_count": 1,
        }
        problems += [
            f"metadata {ARCH6}.{k} = {meta.get(f'{ARCH6}.{k}')!r}, expected {v!r}"
            for k, v in want.items()
            if meta.get(f"{ARCH6}.{k}") != v
        ]
        V, bias = cfg["vocab_size"], bool(cfg.get("attention_bias", bias))
    if C % N:
        problems.append(f"head size {N} does not divide the width {C}")
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    if n_tokens != V:
        problems.append(f"tokenizer.ggml.tokens has {n_tokens} entries, expected vocab_size {V}")
    problems += _tensor_list_problems(expected_rwkv6qwen2_tensors(C, L, V, F, R, Rw, bias), tensors)
    report = GgufReport(meta, tensors, reader)
    if source is not None and not problems:
        sd = read_state_dict(source)
        problems += _compare_to_source(report, lambda name: rwkv6qwen2_gguf_source(name, sd), atol)
    if problems:
        raise CheckpointError(f"{path} is not the expected {ARCH6} GGUF: " + "; ".join(problems))
    return report
