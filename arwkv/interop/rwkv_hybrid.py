"""The published ARWKV checkpoint format (`model_type: "rwkv_hybrid"`): load it into the arwkv student,
export a student to it.

The format (shared/docs/interop-rwkv_hybrid.md) is a Qwen2 checkpoint whose `wkv_layers` carry an RWKV-7
mixer under `model.layers.{i}.self_attn.time_mixer.*`, head size 64 and LoRA ranks 64/64/32/128 (fixed by
the published modeling code). The student keeps the teacher's names with its mixer at `self_attn`, so the key
map is "drop `time_mixer.`"; only the shapes of the (1,1,C) vectors differ. A student whose LoRA ranks are
smaller than the format's is exported with zero-padded LoRAs, which compute the same function (`pad_lora`).

`wkv_version: 6` selects an RWKV-6 mixer. The format description names only the RWKV-7 tensors; for version 6
this module uses BlinkDL's RWKV-6 names, on which RWKVInside's RWKV-6 code is built (not checked against a
released version-6 file): `time_maa_x/w/k/v/r/g` (1,1,C), `time_maa_w1` (C, 5·32), `time_maa_w2` (5, 32, C),
`time_decay` (1,1,C), `time_decay_w1/w2` (C, 64) / (64, C), `time_faaaa` (H, N), `receptance key value output
.weight`, `gate.weight` with `wkv_has_gate`, `ln_x` with `wkv_has_group_norm`; LoRA ranks 64/128 from width
4096 up (BlinkDL's rule); GroupNorm eps 1e-5 · head_size_divisor². The forward is `ArwkvTimeMix6`
(arwkv/ops/wkv6/README.md).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from arwkv.errors import CheckpointError

if TYPE_CHECKING:
    from arwkv.models.arwkv import ArwkvConfig, ArwkvForCausalLM

MODEL_TYPE = "rwkv_hybrid"
ARCHITECTURE = "RwkvHybridForCausalLM"
HEAD_SIZE = 64
LORA_RANKS = {"w": 64, "a": 64, "v": 32, "g": 128}  # hard-coded in the published modeling code
LORA_NAMES = tuple(f"{m}{i}" for m in LORA_RANKS for i in (1, 2))
MIX6 = "wkvrg"  # RWKV-6's five data-dependent token-shift mixes, in the order of time_maa_w1's blocks


def lora_ranks6(hidden: int) -> dict[str, int]:
    """RWKV-6 LoRA ranks (BlinkDL's x060): decay 64 and token-shift mix 32, doubled from width 4096 up."""
    big = hidden >= 4096
    return {"w": 128 if big else 64, "mix": 64 if big else 32}


MIXER = "self_attn.time_mixer."
# Qwen2 fields copied between the hybrid config and the student's teacher_config.
QWEN2_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "attention_dropout",
)
MAX_LISTED = 12  # names shown per category in an error message


@dataclass(frozen=True)
class HybridLayout:
    """What a `rwkv_hybrid` config.json says about the tensors, validated."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_size: int
    head_size_divisor: float
    gate: bool
    group_norm: bool
    wkv_layers: tuple[int, ...]
    tie: bool
    version: int = 7

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> HybridLayout:
        if cfg.get("model_type") != MODEL_TYPE:
            raise CheckpointError(
                f"config.json has model_type {cfg.get('model_type')!r}, not {MODEL_TYPE!r}."
            )
        missing = [
            k
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "vocab_size",
                "intermediate_size",
                "head_size",
                "num_attention_heads",
            )
            if k not in cfg
        ]
        if missing:
            raise CheckpointError(f"rwkv_hybrid config.json lacks {missing}.")
        version = cfg.get("wkv_version", 7)
        if version not in (6, 7):
            raise CheckpointError(
                f"wkv_version {version} is not supported: arwkv runs RWKV-7 (wkv_version 7) and RWKV-6 "
                "(wkv_version 6) mixers."
            )
        if version == 7 and not cfg.get("wkv_use_vfirst", True):
            raise CheckpointError(
                "wkv_use_vfirst is false, but the published RWKV-7 mixer always uses v_first."
            )
        n, c = cfg["num_hidden_layers"], cfg["hidden_size"]
        wkv = _wkv_layers(cfg.get("wkv_layers"), n)
        if version == 7 and 0 not in wkv:
            # The published mixer sets v_first only in layer 0; without it the later RWKV layers have none.
            raise CheckpointError(
                f"wkv_layers {list(wkv)} does not contain layer 0, which the published code "
                "needs to compute v_first."
            )
        if c % cfg["head_size"]:
            raise CheckpointError(f"head_size {cfg['head_size']} does not divide hidden_size {c}.")
        return cls(
            hidden=c,
            layers=n,
            vocab=cfg["vocab_size"],
            intermediate=cfg["intermediate_size"],
            heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            head_size=cfg["head_size"],
            head_size_divisor=cfg.get("head_size_divisor", 8),
            gate=bool(cfg.get("wkv_has_gate", False)),
            group_norm=bool(cfg.get("wkv_has_group_norm", False)),
            wkv_layers=wkv,
            tie=bool(cfg.get("tie_word_embeddings", False)),
            version=version,
        )

    @property
    def group_norm_eps(self) -> float:
        return 1e-5 * self.head_size_divisor**2

    def expected_shapes(self) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """(key -> shape for every tensor the published model has, keys that may be present or absent)."""
        C, H, N, F = self.hidden, self.hidden // self.head_size, self.head_size, self.intermediate
        hd = C // self.heads
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, C),
            "model.norm.weight": (C,),
            "lm_head.weight": (self.vocab, C),
        }
        optional = {"lm_head.weight"} if self.tie else set()
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (C,),
                p + "post_attention_layernorm.weight": (C,),
                p + "mlp.gate_proj.weight": (F, C),
                p + "mlp.up_proj.weight": (F, C),
                p + "mlp.down_proj.weight": (C, F),
            }
            if i not in self.wkv_layers:
                a = p + "self_attn."
                q, kv = self.heads * hd, self.kv_heads * hd
                shapes |= {
                    a + "q_proj.weight": (q, C),
                    a + "q_proj.bias": (q,),
                    a + "k_proj.weight": (kv, C),
                    a + "k_proj.bias": (kv,),
                    a + "v_proj.weight": (kv, C),
                    a + "v_proj.bias": (kv,),
                    a + "o_proj.weight": (C, q),
                }
                continue
            t = p + MIXER
            if self.version == 6:
                shapes |= self._shapes6(t)
                if not self.gate:
                    optional.add(t + "time_maa_g")  # the gate's mix, never read without a gate
                continue
            shapes |= {t + f"x_{m}": (1, 1, C) for m in "rwkvag"}
            for m, r in LORA_RANKS.items():
                shapes |= {t + f"{m}1": (C, r), t + f"{m}2": (r, C)}
                if m != "g":
                    shapes[t + f"{m}0"] = (1, 1, C)
            shapes |= {
                t + "k_k": (1, 1, C),
                t + "k_a": (1, 1, C),
                t + "r_k": (H, N),
                t + "ln_x.weight": (C,),
                t + "ln_x.bias": (C,),
            }
            shapes |= {t + f"{n}.weight": (C, C) for n in ("receptance", "key", "value", "output")}
            if not self.gate:
                for k in ("g1", "g2"):
                    del shapes[t + k]
                optional.add(t + "x_g")  # stored without a gate in some files, never read
            if not self.group_norm:
                del shapes[t + "ln_x.weight"], shapes[t + "ln_x.bias"]
            if i == 0:
                optional |= {t + "v0", t + "v1", t + "v2"}  # layer 0 has no value residual
        return shapes, optional

    def _shapes6(self, t: str) -> dict[str, tuple[int, ...]]:
        C, H, N = self.hidden, self.hidden // self.head_size, self.head_size
        ranks = lora_ranks6(C)
        shapes = {t + f"time_maa_{m}": (1, 1, C) for m in "x" + MIX6}
        shapes |= {
            t + "time_maa_w1": (C, len(MIX6) * ranks["mix"]),
            t + "time_maa_w2": (len(MIX6), ranks["mix"], C),
            t + "time_decay": (1, 1, C),
            t + "time_decay_w1": (C, ranks["w"]),
            t + "time_decay_w2": (ranks["w"], C),
            t + "time_faaaa": (H, N),
        }
        names = ("receptance", "key", "value", "output") + (("gate",) if self.gate else ())
        shapes |= {t + f"{n}.weight": (C, C) for n in names}
        if self.group_norm:
            shapes |= {t + "ln_x.weight": (C,), t + "ln_x.bias": (C,)}
        return shapes

    @property
    def lora_ranks(self) -> dict[str, int]:
        return lora_ranks6(self.hidden) if self.version == 6 else dict(LORA_RANKS)


def _wkv_layers(value: Any, n: int) -> tuple[int, ...]:
    if value is None or value == "full":
        return tuple(range(n))
    if isinstance(value, str):  # "0,1,2" in some hand-written configs
        value = [int(s) for s in value.replace(" ", "").split(",") if s]
    try:
        layers = tuple(sorted({int(i) for i in value}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"wkv_layers must be null, 'full' or a list of layer indices, got {value!r}."
        ) from e
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise CheckpointError(f"wkv_layers {bad} are outside the model's {n} layers.")
    return layers


# ----------------------------------------------------------------------------------------------------
# files


def read_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face checkpoint directory.")
    return json.loads(f.read_text())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: `model.safetensors`, `pytorch_model.bin`, or shards of either
    listed in their `*.index.json`."""
    path = Path(path)
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = path / f"{stem}.{ext}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / f"{stem}.{ext}").is_file():
            files = [f"{stem}.{ext}"]
        else:
            continue
        sd: dict[str, torch.Tensor] = {}
        for name in files:
            if not (path / name).is_file():
                raise CheckpointError(f"{index.name} lists {name}, which is missing from {path}.")
            sd.update(_read_file(path / name))
        return sd
    raise CheckpointError(f"{path} has no model.safetensors, pytorch_model.bin or a sharded index of either.")


def _read_file(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    return torch.load(f, map_location="cpu", weights_only=True)


def check_state_dict(layout: HybridLayout, sd: dict[str, torch.Tensor]) -> None:
    """Raise `CheckpointError` naming every missing key, unknown key and shape mismatch."""
    shapes, optional = layout.expected_shapes()
    missing = sorted(k for k in shapes if k not in sd and k not in optional)
    unknown = sorted(k for k in sd if k not in shapes and not k.endswith("rotary_emb.inv_freq"))
    wrong = [
        f"{k}: {tuple(sd[k].shape)} (expected {shapes[k]})"
        for k in sorted(sd)
        if k in shapes and tuple(sd[k].shape) != shapes[k]
    ]
    problems = [
        f"{len(v)} {what}: {', '.join(v[:MAX_LISTED])}{' ...' if len(v) > MAX_LISTED else ''}"
        for what, v in (("missing keys", missing), ("unknown keys", unknown), ("shape mismatches", wrong))
        if v
    ]
    if problems:
        raise CheckpointError(
            f"the rwkv_hybrid checkpoint does not match its config.json (wkv_version {layout.version}, head "
            f"size {layout.head_size}, LoRA ranks {layout.lora_ranks}, gate {layout.gate}, GroupNorm "
            f"{layout.group_norm}, wkv_layers {list(layout.wkv_layers)}): " + "; ".join(problems)
        )


# ----------------------------------------------------------------------------------------------------
# rwkv_hybrid <-> student


def teacher_config_from_hybrid(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Qwen2 config the hybrid was distilled from, as the student's `teacher_config`."""
    from transformers import Qwen2Config

    fields = {k: cfg[k] for k in QWEN2_FIELDS if cfg.get(k) is not None}
    fields.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    return Qwen2Config(**fields, use_sliding_window=False).to_dict()


def _config_options() -> set[str]:
    import inspect

    from arwkv.models.arwkv import ArwkvConfig

    return set(inspect.signature(ArwkvConfig.__init__).parameters)


def student_config(cfg: dict[str, Any], wkv_backend: str = "auto") -> ArwkvConfig:
    """The ArwkvConfig whose forward is exactly the published one for this rwkv_hybrid config."""
    from arwkv.models.arwkv import ArwkvConfig

    layout = HybridLayout.from_config(cfg)
    opts: dict[str, Any] = dict(
        teacher_config=teacher_config_from_hybrid(cfg),
        version=layout.version,
        head_size=layout.head_size,
        use_gate=layout.gate,
        use_group_norm=layout.group_norm,
        use_token_shift=True,
        use_rope=False,
        use_qk_norm=False,
        rkv_bias=False,
        output_bias=False,
        lora_ranks=layout.lora_ranks,
        softmax_layers=[i for i in range(layout.layers) if i not in layout.wkv_layers],
        wkv_backend=wkv_backend,
    )
    if layout.version == 6:  # the RWKV-6 mixer's GroupNorm eps is RWKV-6's fixed 64e-5
        if layout.group_norm and abs(layout.group_norm_eps - 64e-5) > 1e-15:
            raise CheckpointError(
                f"GroupNorm eps {layout.group_norm_eps:g} (head_size_divisor {layout.head_size_divisor}) "
                "differs from RWKV-6's 64e-5 (head_size_divisor 8), the only one arwkv's RWKV-6 mixer has."
            )
        return ArwkvConfig(**opts)
    supported = _config_options()
    # Options the published forward fixes; passed only where the student has them, else checked for equality.
    if "gate_bias_one" in supported:
        opts["gate_bias_one"] = False
    if "group_norm_eps" in supported:
        opts["group_norm_eps"] = layout.group_norm_eps
    elif layout.group_norm and abs(layout.group_norm_eps - 1e-5 * layout.head_size) > 1e-15:
        raise CheckpointError(
            f"GroupNorm eps {layout.group_norm_eps:g} (head_size_divisor "
            f"{layout.head_size_divisor}) differs from the student's fixed 1e-5 * head_size; "
            "this arwkv version has no group_norm_eps option."
        )
    return ArwkvConfig(**opts)


def hybrid_to_student_key(key: str) -> str:
    return key.replace("." + MIXER, ".self_attn.")


def student_to_hybrid_key(key: str, rwkv_layers: set[int]) -> str:
    parts = key.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn":
        if int(parts[2]) in rwkv_layers:
            return ".".join(parts[:3]) + "." + MIXER + ".".join(parts[4:])
    return key


def _fit(value: torch.Tensor, shape: torch.Size | tuple[int, ...], name: str) -> torch.Tensor:
    """`value` in `shape` when they differ only by size-1 dims ((1,1,C) vs (C,), (H,N) vs (C,)); never a
    transpose, which would silently scramble weights."""
    shape = tuple(shape)
    if tuple(value.shape) == shape:
        return value
    if value.numel() == int(torch.Size(shape).numel()) and (
        [d for d in value.shape if d != 1] == [d for d in shape if d != 1]
        or value.dim() == 2
        and len(shape) == 1
    ):
        return value.reshape(shape)
    raise CheckpointError(
        f"{name}: checkpoint shape {tuple(value.shape)} does not fit the student's {shape}."
    )


def load_rwkv_hybrid(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    wkv_backend: str = "auto",
) -> ArwkvForCausalLM:
    """Load a published ARWKV (`rwkv_hybrid`) checkpoint directory as an arwkv student with the same forward.

    `dtype` defaults to the checkpoint's `torch_dtype`; `wkv_backend` picks the operator ("auto": fla on CUDA
    when installed, the pure-PyTorch chunked kernel otherwise)."""
    from arwkv.models.arwkv import ArwkvForCausalLM

    cfg = read_config(path)
    layout = HybridLayout.from_config(cfg)
    sd = read_state_dict(path)
    check_state_dict(layout, sd)
    config = student_config(cfg, wkv_backend=wkv_backend)
    dtype = dtype or _dtype(cfg.get("torch_dtype") or cfg.get("dtype")) or torch.float32
    with torch.device("meta"):  # no init work or memory for weights that are overwritten anyway
        model = ArwkvForCausalLM(config)
    target = model.state_dict()
    shapes, optional = layout.expected_shapes()
    source = {hybrid_to_student_key(k): k for k in sd if k in shapes}
    if layout.tie:
        source.pop("lm_head.weight", None)
    unread = [k for key, k in source.items() if key not in target and k not in optional]
    if unread:
        raise CheckpointError(
            f"the arwkv student has no parameter for {unread}: this arwkv version cannot represent them."
        )
    new: dict[str, torch.Tensor] = {}
    for key, t in target.items():
        if key in source:  # pop: peak memory stays near one copy of the checkpoint
            new[key] = _fit(sd.pop(source[key]), t.shape, source[key]).to(dtype)
        elif _is_unused_student_param(key, layout):
            new[key] = torch.zeros(t.shape, dtype=dtype)
        elif not (key == "lm_head.weight" and layout.tie):
            raise CheckpointError(f"the checkpoint has nothing for the student's {key}.")
    model.load_state_dict(new, strict=False, assign=True)
    if layout.tie:
        model.tie_weights()
    _materialize_buffers(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"parameters {left} were not loaded.")
    model.config.dtype = dtype
    return model.to(device).eval()


def _is_unused_student_param(key: str, layout: HybridLayout) -> bool:
    """Student parameters the published forward never reads: layer 0's value-residual LoRA, and the gate's
    token-shift mix of a gate-free mixer."""
    name = key.rsplit(".", 1)[-1]
    if layout.version == 6:
        return not layout.gate and ".self_attn." in key and name == "time_maa_g"
    in_layer0 = key.startswith("model.layers.0.self_attn.") and name in ("v0", "v1", "v2")
    return in_layer0 or (not layout.gate and ".self_attn." in key and name == "x_g")


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers built on the meta device (RoPE inverse frequencies) are not in any checkpoint:
    take them from a fresh CPU instance of their (config-built, cheap) module."""
    for name, mod in model.named_modules():
        meta = [n for n, b in mod.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if not hasattr(mod, "config"):
            raise CheckpointError(f"cannot build buffers {meta} of {name} ({type(mod).__name__}).")
        with torch.device("cpu"):
            fresh = type(mod)(mod.config)
        for n in meta:
            setattr(mod, n, getattr(fresh, n))


def _dtype(name: Any) -> torch.dtype | None:
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name), None) if name else None


@dataclass(frozen=True)
class LayoutProblem:
    """One way a student's layout does not fit an export format: what, and the student options that avoid it
    (ArwkvConfig keywords such as "head_size=64"; none when it is the teacher's, not a choice)."""

    what: str
    options: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.what} [avoid with {' '.join(self.options)}]" if self.options else self.what


def export_problems(student: ArwkvForCausalLM) -> list[str]:
    """Each way the student's layout does not fit the published format (empty list = exportable exactly).
    LoRA ranks below the format's are not a problem: the export pads them with zeros (`pad_lora`)."""
    return [str(p) for p in layout_problems(student)]


def layout_problems(student: ArwkvForCausalLM) -> list[LayoutProblem]:
    """`export_problems` with the student option that avoids each problem (for `arwkv export --check`)."""
    cfg = student.config
    t = cfg.teacher_config
    family = t.get("model_type")
    P = LayoutProblem
    problems = []
    if family not in ("qwen2", "llama", "mistral", "qwen3"):
        problems.append(
            P(
                f"teacher family {family!r}: the format is Qwen2 (Llama/Mistral/Qwen3 only without "
                "softmax layers)"
            )
        )
    elif family != "qwen2" and cfg.softmax_layers:
        problems.append(
            P(
                f"softmax_layers {cfg.softmax_layers} with a {family} teacher: the format's attention "
                "layers are Qwen2 attention",
                ("softmax_layers=[]",),
            )
        )
    if t.get("hidden_act", "silu") != "silu" or t.get("mlp_bias"):
        problems.append(
            P(
                f"MLP with hidden_act {t.get('hidden_act')!r} / mlp_bias {t.get('mlp_bias')}: the format "
                "uses Qwen2's SiLU MLP without biases"
            )
        )
    if cfg.wkv_head_size != HEAD_SIZE:
        problems.append(
            P(f"head size {cfg.wkv_head_size} (the format uses {HEAD_SIZE})", (f"head_size={HEAD_SIZE}",))
        )
    if cfg.mixer_dim != t["hidden_size"]:
        expand = getattr(cfg, "mixer_expand", 1)
        fix = ("mixer_expand=1",) if expand != 1 else ()  # else the teacher's own attention width differs
        problems.append(P(f"mixer width {cfg.mixer_dim} != hidden_size {t['hidden_size']}", fix))
    if cfg.rkv_bias or cfg.output_bias:
        problems.append(
            P(
                "biases on receptance/key/value/output (the format has none; copy init keeps a teacher's "
                "q/k/v biases, so a Qwen2 teacher needs student.init=fresh for a bias-free student)",
                ("rkv_bias=false", "output_bias=false"),
            )
        )
    if cfg.use_rope:
        problems.append(P("RoPE on r/k (the format has none)", ("use_rope=false",)))
    if cfg.use_qk_norm:
        problems.append(P("RMSNorm on r/k (use_qk_norm; the format has none)", ("use_qk_norm=false",)))
    if getattr(cfg, "gate_bias_one", False):
        problems.append(
            P(
                "gate 1 + sigmoid(x g1) g2 (the published inference code computes sigmoid(x g1) g2)",
                ("gate_bias_one=false",),
            )
        )
    if getattr(cfg, "use_value_residual", True) is False:
        problems.append(
            P("no value residual (the format always mixes in v_first)", ("use_value_residual=true",))
        )
    if getattr(cfg, "local_window", 0):
        problems.append(
            P(
                f"local_window {cfg.local_window}: the format's RWKV layers have no local softmax branch",
                ("local_window=0",),
            )
        )
    if getattr(cfg, "version", 7) == 6:
        if getattr(cfg, "rwkv6_variant", "finch") == "qrwkv":
            problems.append(
                P(
                    "RWKV-6 mixers of the qrwkv form (no bonus, GLA read, sigmoid gate): the format's "
                    "version 6 is BlinkDL's finch form (export it for llama.cpp's rwkv6qwen2 instead)",
                    ("rwkv6_variant=finch",),
                )
            )
        return problems + _rank_problems6(student)
    if cfg.softmax_layers and 0 in cfg.softmax_layers:
        problems.append(
            P(
                "layer 0 is softmax attention (the format takes v_first from an RWKV layer 0)",
                (f"softmax_layers={[i for i in cfg.softmax_layers if i != 0]}",),
            )
        )
    ranks = student_ranks(student)
    want = {k: v for k, v in LORA_RANKS.items() if k != "g" or cfg.use_gate}
    too_big = {k: r for k, r in ranks.items() if k in want and r > want[k]}
    if too_big or set(ranks) != set(want):
        fix = ("lora_ranks={" + ", ".join(f"{k}: {v}" for k, v in want.items()) + "}",)
        what = f"LoRA ranks {ranks} (the format fixes {want}; smaller ranks are zero-padded, larger are not)"
        problems.append(P(what, fix))
    return problems


def _rank_problems6(student: ArwkvForCausalLM) -> list[LayoutProblem]:
    want = lora_ranks6(student.config.teacher_config["hidden_size"])
    have = student_ranks6(student)
    if all(have.get(k, 0) <= r for k, r in want.items()):
        return []
    fix = ("lora_ranks={" + ", ".join(f"{k}: {v}" for k, v in want.items()) + "}",)
    what = (
        f"RWKV-6 LoRA ranks {have} (the format fixes {want}; smaller ranks are zero-padded, larger are not)"
    )
    return [LayoutProblem(what, fix)]


def student_ranks6(student: ArwkvForCausalLM) -> dict[str, int]:
    """An RWKV-6 student's LoRA ranks, from the first RWKV layer's weights (none without token shift)."""
    m = student.model.layers[student.config.rwkv_layers[0]].self_attn
    ranks = {"w": m.time_decay_w1.shape[1]}
    if hasattr(m, "time_maa_w2"):
        ranks["mix"] = m.time_maa_w2.shape[1]
    return ranks


def pad_mix6(value: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """RWKV-6's token-shift LoRA at a larger rank: time_maa_w1 (C, 5r) is five blocks of r columns (one per
    mix), time_maa_w2 (5, r, C) five r-row factors; zero columns in each block and zero rows in each factor
    add tanh(0) · 0 = 0 to every mix."""
    shape = tuple(shape)
    if tuple(value.shape) == shape:
        return value
    n = len(MIX6)
    if name.endswith("time_maa_w1") and value.dim() == 2 and value.shape[0] == shape[0]:
        r, R = value.shape[1] // n, shape[1] // n
        if r <= R:
            out = value.new_zeros(shape[0], n, R)
            out[:, :, :r] = value.view(shape[0], n, r)
            return out.view(shape)
    if name.endswith("time_maa_w2") and value.dim() == 3 and value.shape[::2] == shape[::2]:
        if value.shape[1] <= shape[1]:
            out = value.new_zeros(shape)
            out[:, : value.shape[1]] = value
            return out
    raise CheckpointError(
        f"{name}: LoRA factor {tuple(value.shape)} cannot be zero-padded to the format's {shape}."
    )


def student_ranks(student: ArwkvForCausalLM) -> dict[str, int]:
    """LoRA ranks read from the first RWKV layer's weights (the config may leave them to size defaults)."""
    layer = student.config.rwkv_layers[0]
    sd = {
        k.split(".")[-1]: v
        for k, v in student.state_dict().items()
        if k.startswith(f"model.layers.{layer}.self_attn.")
    }
    ranks = {}
    for m in LORA_RANKS:
        w = sd.get(f"{m}1")
        if w is not None:
            ranks[m] = w.shape[1]  # stored (C, r), as in the format
    return ranks


def hybrid_config_from_student(student: ArwkvForCausalLM, untie: bool = False) -> dict[str, Any]:
    cfg = student.config
    t = cfg.teacher_config
    rope = t.get("rope_theta") or (t.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    out |= {k: t[k] for k in QWEN2_FIELDS if t.get(k) is not None}
    gn_eps = getattr(cfg, "group_norm_eps", None) or 1e-5 * cfg.wkv_head_size
    if getattr(cfg, "version", 7) == 6:
        gn_eps = 64e-5  # RWKV-6's GroupNorm (head_size_divisor 8)
    out |= {
        "rope_theta": rope,
        "num_key_value_heads": t.get("num_key_value_heads", t["num_attention_heads"]),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings) and not untie,
        "head_size": cfg.wkv_head_size,
        "head_size_divisor": _divisor(gn_eps),
        "wkv_version": getattr(cfg, "version", 7),
        "wkv_has_gate": bool(cfg.use_gate),
        "wkv_has_group_norm": bool(cfg.use_group_norm),
        "wkv_use_vfirst": getattr(cfg, "version", 7) == 7,
        "wkv_layers": cfg.rwkv_layers,
        "torch_dtype": str(next(student.parameters()).dtype).removeprefix("torch."),
    }
    return out


def _divisor(eps: float) -> int | float:
    """head_size_divisor with 1e-5 * d**2 == eps (8 for the usual 64e-5)."""
    d = (eps / 1e-5) ** 0.5
    return round(d) if abs(d - round(d)) < 1e-9 else d


def export_rwkv_hybrid(
    student: ArwkvForCausalLM,
    out: str | Path,
    tokenizer: Any = None,
    untie: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the student as a published-format (`rwkv_hybrid`) checkpoint: config.json + model.safetensors,
    plus the tokenizer when given (a folder with tokenizer files, or a transformers tokenizer).

    Raises `CheckpointError` listing every way the layout does not fit (see `export_problems`); LoRA ranks
    below the format's are zero-padded (`pad_lora`). `untie` writes `lm_head.weight` even for tied embeddings
    (llama.cpp's arwkv7 requires it)."""
    problems = export_problems(student)
    if problems:
        raise CheckpointError("this student does not fit the rwkv_hybrid format: " + "; ".join(problems))
    cfg = hybrid_config_from_student(student, untie=untie)
    layout = HybridLayout.from_config(cfg)
    return write_checkpoint(student, out, _hybrid_tensors(student, layout), cfg, tokenizer, dtype)


def write_checkpoint(
    student: ArwkvForCausalLM,
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A Hugging Face-style folder from an export's tensors and config: model.safetensors, config.json,
    the student's generation config and the tokenizer (its vocabulary checked against the student's)."""
    from safetensors.torch import save_file

    dtype = dtype or next(student.parameters()).dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.to("cpu", dtype).contiguous().clone() for k, v in tensors.items()
    }  # clone: no shared storage
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = cfg | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = getattr(student, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
        check_vocab(out, student.config.vocab_size)
    return out


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",  # recent transformers save the chat template here, not in tokenizer_config
    "chat_template.json",
)


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Copy a tokenizer folder's files (or `save_pretrained` a tokenizer object) into `out`."""
    if not isinstance(tokenizer, (str, Path)):
        tokenizer.save_pretrained(out)
        return
    src = Path(tokenizer)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not copied:
        raise CheckpointError(f"{src} holds none of the tokenizer files {TOKENIZER_FILES}.")
    for f in copied:
        shutil.copy(src / f, out / f)


def check_vocab(out: Path, vocab_size: int) -> None:
    """Every token id of the tokenizer in `out` must have a row in the embedding (llama.cpp's converter
    asserts it too)."""
    top = max_token_id(out)
    if top >= vocab_size:
        raise CheckpointError(
            f"the tokenizer has token id {top}, but the model's vocab_size is {vocab_size}: pass the "
            "teacher's tokenizer (every token id must be below vocab_size)."
        )


def max_token_id(out: Path) -> int:
    tj = out / "tokenizer.json"
    if tj.is_file():  # a JSON read is seconds faster than building the tokenizer
        data = json.loads(tj.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        return max(ids + [t["id"] for t in data.get("added_tokens", [])])
    from transformers import AutoTokenizer

    return max(AutoTokenizer.from_pretrained(out).get_vocab().values())


def pad_lora(value: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A rank-r LoRA factor as the rank-R one of the same product (R >= r): the first factor (C, r) gets
    zero columns, the second (r, D) zero rows. Exact for each RWKV-7 LoRA: the zero columns of w1/a1/v1/g1 add
    zero entries to x @ first; w = tanh(.) @ w2 turns them into tanh(0) = 0 and the linear a, v LoRAs keep 0,
    but the gate g = sigmoid(.) @ g2 turns them into sigmoid(0) = 1/2, so it is the zero rows of the second
    factor that make every padded product exact."""
    shape = tuple(shape)
    if tuple(value.shape) == shape or value.dim() != 2 or len(shape) != 2:
        return value
    first = name.endswith("1")
    keep, grow = (0, 1) if first else (1, 0)  # w1 (C, r): the columns grow; w2 (r, D): the rows
    if value.shape[keep] != shape[keep] or value.shape[grow] > shape[grow]:
        raise CheckpointError(
            f"{name}: LoRA factor {tuple(value.shape)} cannot be zero-padded to the format's {shape}."
        )
    out = value.new_zeros(shape)
    out[: value.shape[0], : value.shape[1]] = value
    return out


def _hybrid_tensors(student: ArwkvForCausalLM, layout: HybridLayout) -> dict[str, torch.Tensor]:
    """The student's weights under the published names and shapes."""
    shapes, optional = layout.expected_shapes()
    rwkv = set(layout.wkv_layers)
    sd: dict[str, torch.Tensor] = {}
    for key, value in student.state_dict().items():
        name = student_to_hybrid_key(key, rwkv)
        if not layout.gate and name.endswith((MIXER + "x_g", MIXER + "time_maa_g")):
            continue  # the published gate-free mixer has no gate mix
        if name not in shapes:
            raise CheckpointError(f"the student's {key} has no place in the rwkv_hybrid format.")
        value = value.detach()
        short = name.rsplit(".", 1)[-1]
        if MIXER in name and layout.version == 6 and short in ("time_decay_w1", "time_decay_w2"):
            value = pad_lora(value, shapes[name], key)
        elif MIXER in name and layout.version == 6 and short in ("time_maa_w1", "time_maa_w2"):
            value = pad_mix6(value, shapes[name], key)
        elif MIXER in name and layout.version == 7 and short in LORA_NAMES:
            value = pad_lora(value, shapes[name], key)
        sd[name] = _fit(value, shapes[name], key)
    if layout.tie:
        sd.pop("lm_head.weight", None)  # transformers re-ties it on load
    else:
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in layout.wkv_layers:  # no token shift in the student = mixes fixed at 0, which the format can hold
        if layout.version == 6:
            names = [f"time_maa_{m}" for m in "xwkvr" + ("g" if layout.gate else "")]
            names += ["time_maa_w1", "time_maa_w2"]
        else:
            names = [f"x_{m}" for m in "rwkva" + ("g" if layout.gate else "")]
        for short in names:
            name = f"model.layers.{i}.{MIXER}{short}"
            sd.setdefault(name, torch.zeros(shapes[name]))
    missing = [k for k in shapes if k not in sd and k not in optional]
    if missing:
        raise CheckpointError(f"the student lacks tensors the format needs: {missing[:MAX_LISTED]}")
    return sd
