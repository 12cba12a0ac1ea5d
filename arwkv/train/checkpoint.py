"""Atomic training checkpoints with everything needed for an exact resume.

Layout of one checkpoint (`<dir>/step_000120/`):
    model.safetensors   full (unsharded) model state, shared tensors stored once
    optimizer.pt        optimizer state keyed by parameter name; scheduler state
    rank<r>.pt          per process: RNG states (python, numpy, torch, cuda) and the data iterator position
    trainer_state.json  step, tokens, metrics history cursor, size + CRC-32 of every other file; written last
    config.yaml         the resolved recipe (when given)

A checkpoint is written to `.tmp-step_…`, every file is fsynced, the folder is renamed into place and the
parent folder fsynced: a crash or a full disk (whatever exception the writer raises) leaves either the
complete new checkpoint or none, and the previous one is never touched. Older checkpoints beyond `keep` are
deleted only after the new one is in place. Resume verifies the checksums and falls back to the newest intact
checkpoint, saying what was wrong with the newer ones.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from arwkv.errors import CheckpointError

PREFIX = "step_"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool) -> bool:
    """True only when every process succeeded (so no rank waits forever on one that failed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def _write(path: Path, writer) -> None:
    """Write one file through `writer(path)` and fsync it. Tests monkeypatch this to simulate a full disk."""
    writer(path)
    _fsync_file(path)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_records(folder: Path) -> dict[str, dict[str, int]]:
    """Size and CRC-32 of every file of a checkpoint folder (what resume verifies)."""
    return {
        f.name: {"bytes": f.stat().st_size, "crc32": _crc32(f)}
        for f in sorted(folder.iterdir())
        if f.is_file()
    }


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with a checkpoint folder (missing, truncated or altered file), or None when intact.

    Checkpoints written before checksums existed are checked for readable state and model files only."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__})"
    files = state.get("files")
    if files is None:
        return None if (path / "model.safetensors").is_file() else "model.safetensors is missing"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != rec["bytes"]:
            return f"{name} has {f.stat().st_size:,} bytes, {rec['bytes']:,} were written"
        if _crc32(f) != rec["crc32"]:
            return f"{name} does not match its checksum (its bytes changed after it was written)"
    return None


def latest_intact_checkpoint(ckpt_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest checkpoint whose files match their checksums; each newer, damaged one is named on stderr."""
    for p in reversed(list_checkpoints(ckpt_dir)):
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        if warn:
            print(
                f"[arwkv] warning: skipping checkpoint {p}: {problem}; trying an older one", file=sys.stderr
            )
    return None


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
    except OSError:
        return "free space unknown"


def _dedupe(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one name per storage, remember the
    aliases."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out, aliases = {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            out[k] = v.contiguous()
    return out, aliases


def rng_state() -> dict[str, Any]:
    """Every RNG's state as plain tensors, ints and tuples: loadable with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with trainer_state.json), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [
        p
        for p in d.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    data_state: Any = None,
    trainer_state: dict[str, Any] | None = None,
    config_yaml: str | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; every process calls this (rank 0 writes the shared files).

    Raises CheckpointError (with the previous checkpoint intact) when anything cannot be written.
    """
    rank, world = _rank_world()
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:06d}"
    # gathering a sharded state is collective: every rank must take part even though only rank 0 writes
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL) if optimizer is not None else None
    error: BaseException | None = None
    try:
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except Exception as e:  # a full disk is not always an OSError (torch's and safetensors' writers)
        error = e
    if not _all_ok(error is None):
        raise _error(ckpt_dir, step, error)
    try:
        _write(tmp / f"rank{rank}.pt", lambda p: torch.save({"rng": rng_state(), "data": data_state}, p))
        if rank == 0:
            tensors, aliases = _dedupe(model_sd)
            _write(
                tmp / "model.safetensors",
                lambda p: save_file(tensors, str(p), metadata={"aliases": json.dumps(aliases)}),
            )
            if optim_sd is not None:
                payload = {"optimizer": optim_sd, "scheduler": scheduler.state_dict() if scheduler else None}
                _write(tmp / "optimizer.pt", lambda p: torch.save(payload, p))
            if config_yaml is not None:
                _write(tmp / "config.yaml", lambda p: p.write_text(config_yaml))
    except Exception as e:
        error = e
    wrote = _all_ok(error is None)
    if rank == 0 and wrote:
        try:
            state = {"step": step, "world_size": world, **(trainer_state or {})}
            state["files"] = _file_records(tmp)
            _write(tmp / "trainer_state.json", lambda p: p.write_text(json.dumps(state, indent=1)))
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(ckpt_dir)
        except Exception as e:
            error = e
    ok = _all_ok(error is None)
    if not ok:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _error(ckpt_dir, step, error)
    if rank == 0:
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _error(ckpt_dir: Path, step: int, error: BaseException | None) -> CheckpointError:
    prev = latest_checkpoint(ckpt_dir)
    first = str(error).strip().splitlines()[0][:200] if error and str(error).strip() else ""
    why = f"{type(error).__name__}: {first}" if error else "another process failed to write its part"
    keep = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return CheckpointError(
        f"could not write checkpoint step {step} in {ckpt_dir} ({why}; {_free_space(ckpt_dir)}); {keep}. "
        "Free disk space (or point out_dir elsewhere) and resume."
    )


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, tied aliases restored."""
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no model.safetensors)")
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata() or {}
    sd = load_file(str(f))
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        sd[alias] = sd[target]
    return sd


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint in place; returns the trainer state with `data` (this rank's data position)."""
    path = Path(path)
    rank, world = _rank_world()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != world:
        raise CheckpointError(
            f"{path} was written by {state.get('world_size')} processes, resuming with {world}: "
            "exact resume needs the same number (or start a new run from its model)."
        )
    try:
        set_model_state_dict(model, load_model_state(path), options=StateDictOptions(full_state_dict=True))
        if optimizer is not None:
            # weights_only: a checkpoint is data, never code (run folders get copied and shared)
            payload = torch.load(path / "optimizer.pt", weights_only=True)
            # strict=False: a trainable tensor that never got a gradient (e.g. the value-residual gate of the
            # first RWKV layer) has no AdamW state
            set_optimizer_state_dict(
                model,
                optimizer,
                payload["optimizer"],
                options=StateDictOptions(full_state_dict=True, strict=False),
            )
            if scheduler is not None and payload["scheduler"] is not None:
                scheduler.load_state_dict(payload["scheduler"])
        per_rank = torch.load(path / f"rank{rank}.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"cannot restore {path}: it holds objects other than tensors and plain data, which arwkv never "
            f"writes and will not execute ({str(e).splitlines()[0]}); resume from another checkpoint"
        ) from e
    except (OSError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot restore {path}: {type(e).__name__}: {e}") from e
    if restore_rng:
        set_rng_state(per_rank["rng"])
    state["data"] = per_rank["data"]
    return state
