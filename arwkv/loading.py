"""The one model loader: every verb that takes a model spec (generate, chat, eval, convert, export, dpo) loads
it through `load_model`.

    >>> model, tok = load_model("runs/smollm2/final")                      # an arwkv student (HF folder)
    >>> model, tok = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)   # a named teacher
    >>> model, tok = load_model("stories260K.bin")                         # llama2.c: tok is None

The format readers beneath it stay where their formats live: `convert.teachers` (named teachers, llama2.c,
GGUF, Hub ids), `interop.rwkv_hybrid` (published ARWKV / RADLADS checkpoints), `models` (the arwkv student).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from arwkv.errors import CheckpointError, DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    wkv_backend: str = "auto",
    tokenizer: str | Path | None = None,
) -> tuple[nn.Module, object | None]:
    """(model in eval mode on `device`, its tokenizer or None when the checkpoint has none).

    spec: a model folder with config.json (an arwkv student, a published `rwkv_hybrid` checkpoint, any
    transformers causal LM), a llama2.c `.bin`, a GGUF file or folder, a named teacher or a Hub id.
    dtype: None keeps the checkpoint's. tokenizer: a tokenizer folder that replaces the checkpoint's.
    Missing, corrupt or unknown files are one `CheckpointError` line, never a traceback."""
    path = Path(str(spec)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        model = _load_folder(path, dtype, wkv_backend)
        tok = _tokenizer(path) if any((path / f).is_file() for f in TOKENIZER_FILES) else None
    else:
        from arwkv.convert.teachers import load_teacher

        model, tok = load_teacher(spec, dtype=dtype if dtype is not None else torch.float32)
    if tokenizer:
        tok = _tokenizer(Path(tokenizer), DataError)
    return model.to(device).eval(), tok


def _load_folder(path: Path, dtype: torch.dtype | None, wkv_backend: str) -> nn.Module:
    from arwkv.interop.rwkv_hybrid import MODEL_TYPE, load_rwkv_hybrid, read_config
    from arwkv.models.files import check_model_folder

    check_model_folder(path)  # missing / truncated / garbage files: one line naming the file
    model_type = read_config(path).get("model_type")
    try:
        if model_type == MODEL_TYPE:
            return load_rwkv_hybrid(path, dtype=dtype, wkv_backend=wkv_backend)
        if model_type == "arwkv":
            from arwkv.models.arwkv import ArwkvForCausalLM

            return ArwkvForCausalLM.from_pretrained(path, dtype=dtype, wkv_backend=wkv_backend)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise CheckpointError(f"could not load the model in {path} with transformers: {e}") from e


def pad_token_id(tokenizer) -> int:
    """The id that pads a tokenizer's batches: its pad token, else its end-of-sequence token, else 0 (no
    tokenizer, or one with neither). Padded positions are masked; the rule only has to be one rule."""
    if tokenizer is None:
        return 0
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def _tokenizer(path: Path, error: type[Exception] = CheckpointError):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise error(f"cannot load the tokenizer {path}: {e}") from e
