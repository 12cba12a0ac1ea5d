"""Configuration of the arwkv student: the teacher's config (a plain dict) plus the RWKV mixer options.

Ships inside every saved checkpoint as remote code, so it imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

WKV_BACKENDS = ("auto", "chunked", "native", "fla")
LORA_KEYS = ("w", "a", "v", "g", "mix")  # "mix": RWKV-6's token-shift LoRA (version 6 only)
VERSIONS = (6, 7)
RWKV6_VARIANTS = ("finch", "qrwkv")  # BlinkDL's RWKV-6; the QRWKV6 / RAD-RWKV6 form (llama.cpp rwkv6qwen2)

# Teacher fields that generic transformers code (generate, tying, resizing) reads from the top-level config.
MIRRORED_TEACHER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


class ArwkvConfig(PreTrainedConfig):
    """A teacher decoder whose attention layers are RWKV-7 (or RWKV-6) time mixing, except `softmax_layers`.

    Args:
        teacher_config: the teacher's `config.to_dict()` (must contain `model_type`).
        version: 7 = RWKV-7 time mixing (default); 6 = RWKV-6 ("Finch": data-dependent token shift, decay
            LoRA, bonus u, GroupNorm, SiLU gate; `lora_ranks` keys "w" and "mix").
        rwkv6_variant: the RWKV-6 form (version 6 only). "finch" (default): BlinkDL's RWKV-6 as above.
            "qrwkv": the form of the QRWKV6 / RAD-RWKV6 Qwen students (llama.cpp `rwkv6qwen2`): no bonus u,
            the state read *after* this token's write (gated linear attention, scale N^-1/2), k scaled by
            (1 - decay), sigmoid gate, no GroupNorm.
        head_size: RWKV head size N; default the teacher's head_dim.
        mixer_expand: r/k/v width as a multiple of the teacher's attention width (more WKV heads, more state
            per layer; copy init repeats the teacher's heads). 1 = the published RWKV-7/ARWKV layout.
        use_gate: output gate: low-rank `g = sigmoid(x_g g1) g2` (version 7), `silu(gate(x_g))` (version 6).
        use_group_norm: per-head GroupNorm `ln_x` on the WKV output (eps 1e-5 * N; RWKV-6's fixed 64e-5).
            Default (None): on, except for the "qrwkv" RWKV-6 form, which has none.
        use_token_shift: mix each token with the previous one (`x_r ... x_g`); off = mu fixed at 0.
        use_rope: apply the teacher's RoPE to r and k (teacher head layout).
        use_qk_norm: per-head RMSNorm on r and k (`r_norm`, `k_norm`), carried over from Qwen3's q/k norms.
        rkv_bias / output_bias: biases on receptance/key/value and on output (copied from Qwen2 / Llama).
        lora_ranks: {"w","a","v","g"} (version 7) or {"w","mix"} (version 6) -> rank; missing keys use the
            size-based defaults of that RWKV version.
        softmax_layers: layer indices that keep the teacher's softmax attention (hybrid).
        local_window: > 0 keeps, inside every mixer, the teacher's attention over the last `local_window`
            positions plus the first `local_sinks` tokens, and adds the RWKV output to it through a gain
            that starts at 0 (the untrained student is then the sliding-window baseline). 0 = pure RWKV-7.
        local_sinks: attention sinks of that local branch.
        wkv_backend: "auto" (fla on CUDA when importable; on CPU arwkv's C++ kernel when arwkv is installed
            and it builds, else chunked), "chunked" (pure PyTorch), "native" (the C++ CPU kernel) or "fla".
        wkv_chunk_size: chunk length of the pure-PyTorch WKV kernel.
    """

    model_type = "arwkv"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        teacher_config: dict[str, Any] | None = None,
        version: int = 7,
        rwkv6_variant: str = "finch",
        head_size: int | None = None,
        mixer_expand: int = 1,
        use_gate: bool = True,
        use_group_norm: bool | None = None,
        use_token_shift: bool = True,
        use_rope: bool = False,
        use_qk_norm: bool = False,
        rkv_bias: bool = False,
        output_bias: bool = False,
        lora_ranks: dict[str, int] | None = None,
        softmax_layers: list[int] | None = None,
        local_window: int = 0,
        local_sinks: int = 4,
        wkv_backend: str = "auto",
        wkv_chunk_size: int = 16,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        if hasattr(teacher_config, "to_dict"):
            teacher_config = teacher_config.to_dict()
        teacher_config = dict(teacher_config or {})
        self.teacher_config = teacher_config
        # Mirror the teacher's top-level fields unless given (e.g. tie_word_embeddings=False unties).
        for key in MIRRORED_TEACHER_FIELDS:
            if key not in kwargs and key in teacher_config:
                kwargs[key] = teacher_config[key]
        self.version = int(version) if str(version).strip().isdigit() else version  # validated below
        self.head_size = head_size
        self.mixer_expand = int(mixer_expand)
        self.use_gate = use_gate
        self.rwkv6_variant = rwkv6_variant
        self.use_group_norm = (rwkv6_variant != "qrwkv") if use_group_norm is None else use_group_norm
        self.use_token_shift = use_token_shift
        self.use_rope = use_rope
        self.use_qk_norm = use_qk_norm
        self.rkv_bias = rkv_bias
        self.output_bias = output_bias
        self.lora_ranks = dict(lora_ranks or {})
        self.softmax_layers = sorted(int(i) for i in (softmax_layers or []))
        self.local_window, self.local_sinks = int(local_window), int(local_sinks)
        self.wkv_backend = wkv_backend
        self.wkv_chunk_size = wkv_chunk_size
        super().__init__(**kwargs)
        self.use_cache = use_cache  # set after the base class, which drops generation-time keys
        self._validate_options()

    def _validate_options(self) -> None:
        if not self.teacher_config:
            return  # an empty config (e.g. built by AutoConfig before from_dict fills it)
        if "model_type" not in self.teacher_config:
            raise ValueError("ArwkvConfig.teacher_config needs the teacher's 'model_type'.")
        if self.version not in VERSIONS:
            raise ValueError(f"version must be 6 (RWKV-6) or 7 (RWKV-7), got {self.version!r}.")
        if self.rwkv6_variant not in RWKV6_VARIANTS:
            raise ValueError(f"rwkv6_variant must be one of {RWKV6_VARIANTS}, got {self.rwkv6_variant!r}.")
        if self.rwkv6_variant == "qrwkv" and self.version != 6:
            raise ValueError("rwkv6_variant='qrwkv' is a form of the RWKV-6 mixer: set version=6 with it.")
        if self.rwkv6_variant == "qrwkv" and self.use_group_norm:
            raise ValueError("rwkv6_variant='qrwkv' has no GroupNorm: leave use_group_norm unset (or false).")
        if self.wkv_backend not in WKV_BACKENDS:
            raise ValueError(f"wkv_backend must be one of {WKV_BACKENDS}, got {self.wkv_backend!r}.")
        unknown = set(self.lora_ranks) - set(LORA_KEYS)
        if unknown:
            raise ValueError(f"lora_ranks keys must be among {LORA_KEYS}, got {sorted(unknown)}.")
        n = self.teacher_config.get("num_hidden_layers")
        bad = [i for i in self.softmax_layers if n is not None and not 0 <= i < n]
        if bad:
            raise ValueError(f"softmax_layers {bad} are outside the teacher's {n} layers.")
        if not 1 <= self.wkv_chunk_size <= 64:  # the chunked kernel's fp32 bound for RWKV-7's clamped decay
            raise ValueError(f"wkv_chunk_size must be in 1..64, got {self.wkv_chunk_size}.")
        if self.local_window < 0 or self.local_sinks < 0:
            raise ValueError(
                f"local_window and local_sinks must be >= 0, got {self.local_window} and {self.local_sinks}."
            )
        if self.mixer_expand < 1:
            raise ValueError(f"mixer_expand must be a positive integer, got {self.mixer_expand}.")
        dim = self.mixer_dim
        if dim % self.wkv_head_size != 0:
            raise ValueError(
                f"head_size {self.wkv_head_size} must divide the mixer width {dim} (RWKV-{self.version} "
                f"heads over mixer_expand x the teacher's attention width); pick a divisor of {dim}."
            )

    @property
    def teacher_head_dim(self) -> int:
        t = self.teacher_config
        return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]

    @property
    def mixer_dim(self) -> int:
        """Width D of r/k/v in a mixer: mixer_expand x the teacher's num_attention_heads * head_dim (mostly
        hidden_size)."""
        return self.mixer_expand * self.teacher_config["num_attention_heads"] * self.teacher_head_dim

    @property
    def wkv_head_size(self) -> int:
        return self.head_size or self.teacher_head_dim

    @property
    def rwkv_layers(self) -> list[int]:
        return [i for i in range(self.teacher_config["num_hidden_layers"]) if i not in self.softmax_layers]


__all__ = ["ArwkvConfig"]
