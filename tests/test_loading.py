"""`arwkv.loading.load_model`, the one model loader, on every kind of model folder it meets."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from arwkv.convert import build_student
from arwkv.convert.families import tiny_teacher
from arwkv.errors import CheckpointError
from arwkv.loading import load_model, pad_token_id
from arwkv.models import ArwkvForCausalLM

IDS = torch.tensor([[3, 17, 5, 9, 42, 7]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_teacher_and_student_folders_load_with_the_same_forward(tmp_path: Path) -> None:
    teacher = tiny_teacher("llama", seed=0).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    student = build_student(teacher, init="copy").eval()
    student.save_pretrained(tmp_path / "student")

    loaded, tok = load_model(tmp_path / "teacher")
    assert type(loaded) is type(teacher) and not loaded.training and tok is None
    torch.testing.assert_close(_logits(loaded), _logits(teacher), rtol=0, atol=1e-5)
    loaded, _ = load_model(str(tmp_path / "student"), wkv_backend="chunked")
    assert isinstance(loaded, ArwkvForCausalLM) and loaded.config.wkv_backend == "chunked"
    torch.testing.assert_close(_logits(loaded), _logits(student), rtol=0, atol=1e-5)
    half, _ = load_model(tmp_path / "student", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_bad_model_folders_are_one_line(tmp_path: Path) -> None:
    tiny_teacher("llama", seed=0).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "m")
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
    tiny_teacher("llama", seed=0).save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "t")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing-here")


def test_no_other_module_loads_models_itself() -> None:
    """Model weights are read by load_model and the format readers beneath it, nowhere else."""
    package = Path(__file__).resolve().parents[1] / "arwkv"
    readers = {"loading.py", "convert/teachers.py", "convert/gguf.py"}
    allowed = readers | {"recipes/export.py"}  # re-reads its own export to verify it
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                owner = node.func.value
                name = getattr(owner, "id", getattr(owner, "attr", ""))
                if name.endswith("ForCausalLM"):
                    found.add(path.relative_to(package).as_posix())
    assert found <= allowed, sorted(found - allowed)


def test_one_pad_rule_and_every_batching_site_uses_it() -> None:
    """pad token, else end of sequence, else 0 — and no module of the package spells the rule out again."""
    from types import SimpleNamespace as Tok

    assert pad_token_id(Tok(pad_token_id=0, eos_token_id=2)) == 0  # a pad id of 0 is a pad id, not "unset"
    assert pad_token_id(Tok(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(Tok(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_token_id(None) == 0
    package = Path(__file__).resolve().parents[1] / "arwkv"
    again = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "loading.py" and "pad_token_id is not None" in p.read_text()
    ]
    assert again == []
