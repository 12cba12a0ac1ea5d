"""Check a saved model folder before a loader reads it, so that a damaged download or an interrupted copy is
one clear line instead of a JSON or safetensors traceback from deep inside transformers."""

from __future__ import annotations

import json
from pathlib import Path

from arwkv.errors import CheckpointError

_FIX = "re-save or re-download the model"


def check_model_folder(path: str | Path) -> None:
    """Raise CheckpointError when `config.json` is not a JSON object or a safetensors file is damaged
    (unreadable header, fewer bytes than its tensors need, a shard of the index missing)."""
    from safetensors import safe_open

    path = Path(path)
    cfg = path / "config.json"
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json: not a saved model folder") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{cfg} is not a readable JSON config ({type(e).__name__}); {_FIX}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{cfg} holds a {type(obj).__name__}, not a config object; {_FIX}")
    index = path / "model.safetensors.index.json"
    shards = sorted(path.glob("*.safetensors"))
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} is unreadable ({type(e).__name__}); {_FIX}") from None
        missing = sorted(w for w in wanted if not (path / w).is_file())
        if missing:
            raise CheckpointError(f"{path} lacks the weight shards {missing}; {_FIX}")
    for f in shards:
        try:
            with safe_open(str(f), framework="pt") as fh:  # validates the header against the file size
                fh.keys()
        except Exception as e:  # safetensors raises its own error type
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{f} is damaged or truncated ({first}); {_FIX}") from None
