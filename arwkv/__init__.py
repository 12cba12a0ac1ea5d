"""arwkv: turn a pretrained Hugging Face Transformer into an RWKV-7 RNN by distillation.

The small public API (imported lazily, so `import arwkv` stays cheap):

    >>> import arwkv
    >>> result = arwkv.run_recipe("stories260k", ["distill.tokens=1e6"])   # the whole pipeline
    >>> cfg = arwkv.load_recipe("smollm2-135m", ["distill.lr=5e-4"])     # typed RecipeConfig
    >>> teacher, tok = arwkv.load_model("smollm2-135m-instruct")         # any model spec, one loader
    >>> student = arwkv.build_student(teacher, init="copy", untie_embeddings=True)
    >>> arwkv.heldout_metrics(student, teacher, batches)                 # KL / NLL / top-1 vs the teacher
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "run_recipe": "arwkv.recipes.convert",
    "load_student": "arwkv.recipes.students",
    "load_recipe": "arwkv.config",
    "RecipeConfig": "arwkv.config",
    "StageConfig": "arwkv.config",
    "AlignConfig": "arwkv.config",
    "DistillConfig": "arwkv.config",
    "SFTConfig": "arwkv.config",
    "build_student": "arwkv.convert.build",
    "load_model": "arwkv.loading",
    "load_teacher": "arwkv.convert.teachers",
    "ArwkvConfig": "arwkv.models.arwkv",
    "ArwkvForCausalLM": "arwkv.models.arwkv",
    "train": "arwkv.train.loop",
    "heldout_metrics": "arwkv.train.metrics",
    "AlignTask": "arwkv.recipes.align",
    "DistillTask": "arwkv.recipes.distill",
    "SFTTask": "arwkv.recipes.sft",
}

# (`arwkv.convert` is the build-time subpackage, hence `run_recipe` for the pipeline)
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'arwkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
