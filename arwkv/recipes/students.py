"""The model side of a run: the teacher loaded for distillation, the student built from it or restored from a
checkpoint, and the switches a stage sets on it. Beside the pipeline (`recipes/convert.py`) so that every verb
that needs a student (convert, dpo, export, select-layers) builds it the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from arwkv.config import RecipeConfig
from arwkv.errors import CheckpointError, ConfigError
from arwkv.train import checkpoint as ckpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_teacher_model(
    path: str, dtype: str, device: torch.device, tokenizer_path: str | None = None
) -> tuple[nn.Module, Any]:
    """(teacher in eval mode without gradients, tokenizer or None)."""
    from arwkv.loading import load_model

    if not path:
        raise ConfigError(
            "no teacher: set teacher.path (HF id or folder, llama2.c .bin, .gguf, or a known name)"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"teacher.dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    teacher, tokenizer = load_model(path, dtype=DTYPES[dtype], device=device, tokenizer=tokenizer_path)
    if tokenizer is not None:
        from arwkv.data.packing import check_tokenizer_vocab

        check_tokenizer_vocab(tokenizer, teacher)
    teacher.requires_grad_(False)
    return teacher, tokenizer


def build_student_for(cfg: RecipeConfig, teacher: nn.Module) -> nn.Module:
    from arwkv.convert.build import build_student

    if isinstance(cfg.student.softmax_layers, str):
        raise ConfigError(
            f"student.softmax_layers={cfg.student.softmax_layers!r} is not resolved yet: `arwkv convert` "
            "measures it, or run `arwkv select-layers` and give the layers it prints"
        )
    torch.manual_seed(cfg.seed)  # fresh-init tensors are random
    options = dict(cfg.student.mixer)
    if cfg.student.softmax_layers:
        options["softmax_layers"] = list(cfg.student.softmax_layers)
    try:
        student = build_student(
            teacher, init=cfg.student.init, untie_embeddings=cfg.student.untie_embeddings, **options
        )
    except ValueError as e:  # a mixer option that does not fit this teacher (e.g. head_size vs width)
        raise ConfigError(f"student.mixer {options}: {e}") from e
    return student.float().train()


def load_student(
    path: str | Path, cfg: RecipeConfig | None = None, teacher: nn.Module | None = None
) -> nn.Module:
    """A student from an HF folder (`final/`), a training checkpoint (`step_…/`) or a stage folder (its latest
    checkpoint). Checkpoints need the teacher and recipe to rebuild the architecture first."""
    p = Path(path)
    if (p / "config.json").is_file():
        from arwkv.loading import load_model

        return load_model(p)[0].train()
    if (p / "checkpoints").is_dir():
        latest = ckpt.latest_intact_checkpoint(p / "checkpoints")
        if latest is None:
            raise CheckpointError(f"{p} has no complete, intact checkpoint")
        p = latest
    if not (p / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is neither a saved student (config.json) nor a training checkpoint")
    if cfg is None or teacher is None:
        raise CheckpointError(f"{path} is a training checkpoint: loading it needs the recipe and its teacher")
    student = build_student_for(cfg, teacher)
    restore_student(student, p)
    return student


def restore_student(student: nn.Module, checkpoint: Path) -> None:
    """Load the student tensors of a training checkpoint (saved from a stage task, keys `student.…`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sd = {k.removeprefix("student."): v for k, v in ckpt.load_model_state(checkpoint).items()}
    expected = set(student.state_dict())
    if set(sd) != expected:
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise CheckpointError(
            f"{checkpoint} does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(was the recipe's student section changed?)"
        )
    set_model_state_dict(student, sd, options=StateDictOptions(full_state_dict=True))  # plain, DDP or FSDP


def enable_grad_checkpointing(cfg: RecipeConfig, student: nn.Module) -> None:
    if cfg.grad_checkpointing:
        # recompute each decoder layer in backward (transformers >= 5.x renamed the switch)
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
