"""One entry point for every kind of teacher: `load_teacher(spec) -> (model, tokenizer or None)`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from arwkv.convert.gguf import load_gguf_teacher
from arwkv.convert.llama2c import load_llama2c
from arwkv.errors import CheckpointError

# Short names for teachers arwkv knows how to fetch without a path.
NAMED_TEACHERS = {"smollm2-135m-instruct": lambda dtype: load_gguf_teacher(dtype=dtype)}
ACCEPTED = (
    "a Hugging Face model folder (config.json + weights), a llama2.c .bin checkpoint, a .gguf file, "
    "a Hub id such as Qwen/Qwen2.5-0.5B-Instruct, or one of the names " + ", ".join(NAMED_TEACHERS)
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_teacher_spec(spec: str | Path) -> None:
    """Raise the error `load_teacher` would give for a teacher that cannot exist, without loading anything
    (the CLI checks this before starting several processes, so the message is printed once, up front)."""
    name = str(spec).strip()
    path = Path(name).expanduser()
    if name.lower() in NAMED_TEACHERS or path.exists():
        return
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return
    raise CheckpointError(f"teacher {name!r} does not exist: no such file or folder; expected {ACCEPTED}")


def load_teacher(spec: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, object]:
    """(teacher model in eval mode, its tokenizer or None when the checkpoint has none, e.g. llama2.c).

    >>> model, tok = load_teacher("../shared/assets/llama2c-stories260K/stories260K.bin")   # tok is None
    >>> model, tok = load_teacher("smollm2-135m-instruct")
    >>> model, tok = load_teacher("runs/my-teacher")          # save_pretrained folder
    """
    name = str(spec).strip()
    if name.lower() in NAMED_TEACHERS:
        return NAMED_TEACHERS[name.lower()](dtype)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf_teacher(path, dtype=dtype)
        if path.suffix == ".bin":
            return load_llama2c(path, dtype=dtype), None
        raise CheckpointError(f"teacher {path} is a file of unknown kind; expected {ACCEPTED}")
    if path.is_dir():
        if (path / "config.json").is_file():
            has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
            return _load_hf(str(path), dtype, has_tokenizer=has_tokenizer)
        if any(path.glob("*.gguf")):
            return load_gguf_teacher(path, dtype=dtype)
        raise CheckpointError(
            f"teacher folder {path} has no config.json and no .gguf file; expected {ACCEPTED}"
        )
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        try:
            return _load_hf(name, dtype, has_tokenizer=True)
        except CheckpointError as e:
            raise CheckpointError(
                f"teacher {name!r} is not a local file or folder, and loading it as a "
                f"Hugging Face Hub id failed: {e.__cause__ or e}"
            ) from e
    check_teacher_spec(name)
    raise AssertionError("unreachable: check_teacher_spec accepts only existing or hub-id teachers")


def _load_hf(where: str, dtype: torch.dtype, has_tokenizer: bool) -> tuple[PreTrainedModel, object]:
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where) if has_tokenizer else None
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"could not load teacher {where!r} with transformers: {e}") from e
    return model.eval(), tokenizer
