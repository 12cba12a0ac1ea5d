"""`arwkv export`: a student written where users run models, checked before it replaces OUT.

    arwkv export runs/x --to gguf out/x-q8_0.gguf --dtype q8_0   llama.cpp (arwkv7 or rwkv6qwen2)
    arwkv export runs/x --to rwkv_hybrid out/x-hybrid            the published ARWKV format
    arwkv export runs/x --to hf out/x-bf16 --dtype bf16          a transformers folder (remote code inside)
    arwkv export smollm2-135m --to gguf x.gguf --check           a recipe: will its student export?

1. every problem is collected first and reported in one message: layouts the format cannot hold (each with
   the recipe key that avoids it), a missing tokenizer or converter, an OUT that exists without --overwrite;
2. the export goes to a temporary folder beside OUT, with the source's tokenizer files and chat template;
3. what was written is read back and compared with the student: hf reloads to bit-identical weights and
   fp32 logits, rwkv_hybrid to bit-identical fp32 logits (within float rounding when LoRA ranks below 16 were
   padded: another GEMM width may sum in another order); GGUF tensors equal the export (`check_gguf`), and
   when llama.cpp's Python bindings are installed their logits are compared too;
4. only then does it replace OUT.

`--dtype` rounds the student to bf16/f16 once; the checks compare against that rounded student. q8_0 is
GGUF only (llama.cpp quantizes the f32 export).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arwkv.errors import ArwkvError, CheckpointError, ConfigError

FORMATS = ("gguf", "rwkv_hybrid", "hf")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "q8_0": torch.float32}
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
CHECK_TOKENS = 24  # token ids in the logit comparisons
LLAMACPP_ATOL = 0.05  # f32 GGUF vs arwkv (the SmolLM2-135M export agreed within 0.004)
ROUNDING = 1e-4  # relative: what another summation order in the padded LoRA matmuls can move fp32 logits


@dataclass
class ExportResult:
    """What `run_export` wrote (None for --check) and what it checked, one line each."""

    out: Path | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Source:
    """The student to export: loaded weights (fp32) or, for a recipe, its layout on the meta device."""

    student: Any
    label: str
    tokenizer: Path | None  # folder with tokenizer files (None: a token-id model)
    folder: Path | None = None  # the student folder (None for a recipe)
    recipe: bool = False  # a layout only: the tokenizer is the teacher's, known to exist but not read


def run_export(
    source: str | Path,
    to: str,
    out: str | Path | None = None,
    dtype: str = "f32",
    *,
    overwrite: bool = False,
    check: bool = False,
    tokenizer: str | Path | None = None,
    overrides: list[str] | None = None,
) -> ExportResult:
    """Export `source` (a run folder, a student folder, a published rwkv_hybrid folder, or with `check` a
    recipe) to format `to` at `out`; see the module docstring. One `ArwkvError` names every problem."""
    _check_args(to, dtype, out, check)
    src = resolve_source(source, overrides or [], check)
    if tokenizer is not None:
        src.tokenizer = Path(tokenizer)
    out = Path(out) if out is not None else None
    problems = layout_problems(src.student, to)
    problems += _tokenizer_problems(src, to)
    if to == "gguf":
        from arwkv.interop.llamacpp import find_converter

        try:
            find_converter()
        except ArwkvError as e:
            problems.append(str(e))
    if out is not None:
        problems += _output_problems(out, src, overwrite)
    if problems:
        raise ConfigError(_one_message(f"{src.label} cannot be exported to {to}", problems))
    notes = [f"{src.label}: the layout fits {to}"] + _padding_notes(src.student, to)
    if check or out is None:
        return ExportResult(None, notes)
    student = _rounded(src.student, DTYPES[dtype])
    write = {"hf": _write_hf, "rwkv_hybrid": _write_hybrid, "gguf": _write_gguf}[to]
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        written, checked = write(student, src, work, dtype)
        _replace(out, written)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out, notes + checked)


# ------------------------------------------------------------------------------------------ what to export


def _check_args(to: str, dtype: str, out: str | Path | None, check: bool) -> None:
    if to not in FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "q8_0" and to != "gguf":
        raise ConfigError("--dtype q8_0 is a GGUF quantization: use it with --to gguf (or f32/bf16/f16)")
    if out is None and not check:
        raise ConfigError("give OUT, the path to write (or --check to only report what would not export)")
    if to == "gguf" and out is not None and Path(out).suffix != ".gguf":
        raise ConfigError(f"with --to gguf, OUT is the .gguf file to write (e.g. {Path(out).name}.gguf)")


def resolve_source(spec: str | Path, overrides: list[str], check: bool) -> Source:
    """A run folder (its final/), a student or rwkv_hybrid folder, or (for --check) a recipe."""
    path = Path(spec)
    if path.is_dir():
        return _folder_source(path)
    from arwkv.config import load_recipe

    try:
        cfg = load_recipe(str(spec), overrides)
    except ConfigError as e:
        if "no recipe named" not in str(e):
            raise
        raise CheckpointError(
            f"{spec} is neither a folder (a run, or a student saved by arwkv) nor a recipe name or .yaml file"
        ) from None
    if not check:
        raise ConfigError(
            f"{spec} is a recipe, not a trained student: train it first (arwkv convert --recipe {spec}), "
            "or add --check to see whether its student will export"
        )
    return _recipe_source(cfg, str(spec))


def _folder_source(path: Path) -> Source:
    from arwkv.loading import load_model
    from arwkv.models.arwkv import ArwkvForCausalLM

    if (path / "final" / "config.json").is_file():
        path = path / "final"
    elif not (path / "config.json").is_file():
        if (path / "config.yaml").is_file():
            raise CheckpointError(
                f"{path} is a run folder without final/: the run has not finished (rerun its "
                "`arwkv convert` command; it resumes)"
            )
        raise CheckpointError(f"{path} holds no student: no config.json and no final/ folder")
    model, _ = load_model(path)
    if not isinstance(model, ArwkvForCausalLM):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise CheckpointError(
            f"{path} is a {kind} model, not an arwkv student: convert it first (arwkv convert)"
        )
    tok = path if any((path / f).is_file() for f in TOKENIZER_MARKERS) else None
    return Source(model, str(path), tok, folder=path)


def _recipe_source(cfg: Any, label: str) -> Source:
    """The recipe's student built on the meta device from the teacher's config: its layout, no weights."""
    from transformers import AutoModelForCausalLM

    from arwkv.recipes.students import build_student_for

    teacher_config, tok = _teacher_config(cfg.teacher.path)
    if cfg.teacher.tokenizer:
        tok = Path(cfg.teacher.tokenizer)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(teacher_config)
        student = build_student_for(cfg, teacher)
    return Source(student, f"recipe {label}", tok, recipe=True)


def _teacher_config(spec: str) -> tuple[Any, Path | None]:
    """(the teacher's config, its tokenizer folder or None); reads only config.json where there is one."""
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        tok = path if any((path / f).is_file() for f in TOKENIZER_MARKERS) else None
        return AutoConfig.from_pretrained(path), tok
    from arwkv.convert.teachers import NAMED_TEACHERS
    from arwkv.loading import load_model

    hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not path.exists() and hub_id and spec.lower() not in NAMED_TEACHERS:
        try:
            cfg = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the config of teacher {spec!r} (offline?): {e}") from None
        return cfg, None  # a Hub model ships its tokenizer
    teacher, tokenizer = load_model(spec)  # llama2.c / GGUF / named: small files, loaded whole
    return teacher.config, (Path(str(tokenizer.name_or_path)) if tokenizer is not None else None)


# --------------------------------------------------------------------------------------------- problems


def recipe_key(option: str) -> str:
    """An ArwkvConfig option ("head_size=64") as the recipe key that sets it, quoted for a shell if needed."""
    prefix = "student." if option.startswith("softmax_layers=") else "student.mixer."
    return f"'{prefix}{option}'" if any(c in option for c in " {}[]") else prefix + option


def layout_problems(student: Any, to: str) -> list[str]:
    """Each way the student's layout does not fit `to`, with the recipe key that avoids it."""
    from arwkv.interop.llamacpp import llamacpp_layout_problems
    from arwkv.interop.rwkv_hybrid import layout_problems as hybrid_problems

    if to == "hf":
        return []  # the student's own format holds every layout
    found = llamacpp_layout_problems(student) if to == "gguf" else hybrid_problems(student)
    keys = [" ".join(recipe_key(o) for o in p.options) for p in found]
    return [p.what + (f" -> set {k} before training" if k else "") for p, k in zip(found, keys, strict=True)]


def _tokenizer_problems(src: Source, to: str) -> list[str]:
    if src.tokenizer is None:
        if to == "gguf":
            return [
                "no tokenizer: llama.cpp's converter needs the tokenizer files (pass --tokenizer DIR, the "
                "teacher's tokenizer folder)"
            ]
        return []
    if src.recipe:
        return []
    if not any((src.tokenizer / f).is_file() for f in TOKENIZER_MARKERS):
        return [f"--tokenizer {src.tokenizer} holds none of {', '.join(TOKENIZER_MARKERS)}"]
    from arwkv.interop.rwkv_hybrid import max_token_id

    top, vocab = max_token_id(src.tokenizer), src.student.config.vocab_size
    if top >= vocab:
        return [f"the tokenizer in {src.tokenizer} has token id {top}, but the model's vocab_size is {vocab}"]
    return []


def _output_problems(out: Path, src: Source, overwrite: bool) -> list[str]:
    if not out.exists():
        return []
    if not overwrite:
        return [f"{out} exists: pass --overwrite to replace it"]
    target, folder = out.resolve(), src.folder.resolve() if src.folder is not None else None
    if folder is not None and (target == folder or target in folder.parents):
        return [f"{out} is (or holds) the student being exported: choose another OUT"]
    if out.is_dir() and not (out / "config.json").is_file():
        return [f"{out} is a folder but not an earlier export (no config.json): remove it yourself"]
    return []


def _one_message(head: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{head}: {problems[0]}"
    return f"{head} ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems)


def _padding_notes(student: Any, to: str) -> list[str]:
    if to == "hf":
        return []
    from arwkv.interop.rwkv_hybrid import LORA_RANKS, student_ranks

    ranks = student_ranks(student)
    padded = {k: f"{r}->{LORA_RANKS[k]}" for k, r in ranks.items() if r < LORA_RANKS[k]}
    if not padded:
        return []
    listed = ", ".join(f"{k} {v}" for k, v in padded.items())
    return [f"LoRA ranks zero-padded to the format's ({listed}): the same function, exactly"]


# ---------------------------------------------------------------------------------------------- writing


def _rounded(student: Any, dtype: torch.dtype) -> Any:
    """The student as `dtype` holds it, kept in fp32 for the comparisons (in place: no second copy)."""
    return student if dtype == torch.float32 else student.to(dtype).float()


def _check_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, CHECK_TOKENS), generator=g)


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits[0].float()


def _same_logits(student: Any, reloaded: Any, what: str, padded: bool = False) -> str:
    """The reloaded model's fp32 logits are the student's: bit for bit, or for a zero-padded export within
    float rounding (a GEMM of another width may sum in another order; ranks >= 16 were bitwise here)."""
    ids = _check_ids(student.config.vocab_size)
    a, b = _logits(student, ids), _logits(reloaded.float(), ids)
    n = f"{ids.shape[1]} tokens"
    if torch.equal(a, b):
        return f"{what}: reloaded, fp32 logits bit-identical to the student's on {n}"
    diff = (a - b).abs().max().item()
    if padded and diff <= ROUNDING * (1 + a.abs().max().item()):
        return f"{what}: reloaded, fp32 logits equal to the student's within rounding on {n} (max {diff:.2g})"
    raise CheckpointError(f"{what}: reloaded logits differ from the student's (max |diff| {diff:.3g})")


def _copy_tokenizer(src: Source, out: Path) -> None:
    from arwkv.interop.rwkv_hybrid import save_tokenizer

    if src.tokenizer is not None:
        save_tokenizer(src.tokenizer, out)


def _tokenizer_note(src: Source, out: Path) -> str:
    """Check the tokenizer in `out` reads back as the source's (same vocabulary, same chat template)."""
    if src.tokenizer is None:
        return "no tokenizer (a token-id model)"
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(src.tokenizer), AutoTokenizer.from_pretrained(out)
    if a.get_vocab() != b.get_vocab() or a.chat_template != b.chat_template:
        raise CheckpointError(f"the tokenizer written to {out} does not read back as {src.tokenizer}'s")
    return "tokenizer carried" + (" with its chat template" if a.chat_template else " (no chat template)")


def _write_hf(student: Any, src: Source, work: Path, dtype: str) -> tuple[Path, list[str]]:
    from arwkv.models.arwkv import ArwkvForCausalLM

    student.to(DTYPES[dtype]).save_pretrained(work)
    student.float()
    _copy_tokenizer(src, work)
    reloaded = ArwkvForCausalLM.from_pretrained(work, dtype=torch.float32).eval()
    _same_weights(student.state_dict(), reloaded.state_dict(), "hf")
    missing = [f for f in ("configuration_arwkv.py", "modeling_arwkv.py") if not (work / f).is_file()]
    if missing:
        raise CheckpointError(f"save_pretrained did not write the remote code {missing}")
    checked = [_same_logits(student, reloaded, "hf"), _tokenizer_note(src, work)]
    return work, checked


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    bad = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k].to(a[k].dtype)))
    if bad or set(b) - set(a):
        raise CheckpointError(f"{what}: reloaded weights differ from the student's: {bad[:8]}")


def _write_hybrid(student: Any, src: Source, work: Path, dtype: str) -> tuple[Path, list[str]]:
    from arwkv.interop.rwkv_hybrid import export_rwkv_hybrid, load_rwkv_hybrid

    export_rwkv_hybrid(student, work, tokenizer=src.tokenizer, dtype=DTYPES[dtype])
    reloaded = load_rwkv_hybrid(work, dtype=torch.float32)
    padded = bool(_padding_notes(student, "rwkv_hybrid"))
    return work, [_same_logits(student, reloaded, "rwkv_hybrid", padded), _tokenizer_note(src, work)]


def _write_gguf(student: Any, src: Source, work: Path, dtype: str) -> tuple[Path, list[str]]:
    from arwkv.interop.llamacpp import check_gguf, convert_to_gguf, export_for_llamacpp

    hybrid, gguf = work / "hf", work / "model.gguf"
    # bf16/f16: the export already holds the rounded weights, so every f32/f16 GGUF tensor must equal it
    export_for_llamacpp(student, hybrid, src.tokenizer, dtype=DTYPES[dtype])
    convert_to_gguf(hybrid, gguf, outtype=dtype)
    report = check_gguf(gguf, source=hybrid)
    n, m = len(report.tensors), len(report.compared)
    arch = report.metadata.get("general.architecture")
    checked = [f"gguf: {n} tensors as llama.cpp's {arch} expects, {m} bit-identical to the export"]
    if m < n:
        checked[-1] += f", {n - m} {dtype} blocks checked by name and shape"
    template = getattr(_tokenizer(src), "chat_template", None)
    if template and report.metadata.get("tokenizer.chat_template") != template:
        checked.append("warning: the GGUF does not carry the tokenizer's chat template")
    elif template:
        checked.append("tokenizer and chat template carried")
    checked.append(_llamacpp_logits(student, gguf, dtype))
    return gguf, checked


def _tokenizer(src: Source) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src.tokenizer) if src.tokenizer is not None else None


def _llamacpp_logits(student: Any, gguf: Path, dtype: str) -> str:
    """llama.cpp's own graph (arwkv7 / rwkv6qwen2) on the GGUF against the student, when its Python bindings
    are installed.
    One token per batch: llama.cpp's batched q8_0 path has crashed in its AMX kernels on some CPUs."""
    try:
        import llama_cpp
    except ImportError:
        return "llama.cpp runtime (llama-cpp-python) not installed: logits not compared"
    import numpy as np

    ids = _check_ids(student.config.vocab_size)
    llm = llama_cpp.Llama(
        model_path=str(gguf), logits_all=True, n_ctx=64, n_batch=1, n_ubatch=1, n_threads=1, verbose=False
    )
    try:
        llm.eval(ids[0].tolist())
        got = np.array(llm.scores[: ids.shape[1]])
    finally:
        llm.close()
    diff = float(np.abs(got - _logits(student, ids).numpy()).max())
    if dtype == "f32" and diff > LLAMACPP_ATOL:
        raise CheckpointError(f"llama.cpp's logits differ from arwkv's by {diff:.3g} (> {LLAMACPP_ATOL})")
    return f"llama.cpp runtime: max |logit diff| {diff:.3g} vs arwkv on {ids.shape[1]} tokens ({dtype})"


def _replace(out: Path, written: Path) -> None:
    """Move the checked export into place, replacing an earlier one (the checks allowed it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    written.rename(out)


def cli_export(args: Any) -> int:
    """`arwkv export` (arwkv.cli): run it and print one line per check."""
    result = run_export(
        args.source,
        args.to,
        args.out,
        args.dtype,
        overwrite=args.overwrite,
        check=args.check,
        tokenizer=args.tokenizer,
        overrides=args.overrides,
    )
    for note in result.notes:
        print(f"[arwkv] {note}")
    if result.out is not None:
        print(f"exported: {result.out}")
    return 0
