"""Score several models in one run (teacher, students, the sink+window baseline) and write the report.

`run_eval` is what `arwkv eval` calls; `evaluate` is the in-memory core for models already loaded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from arwkv.errors import CheckpointError, ConfigError
from arwkv.eval import report
from arwkv.eval.loglik import loglikelihood
from arwkv.eval.stats import aggregate
from arwkv.eval.tasks import TASKS, get_task
from arwkv.loading import load_model

EXTRA_TASKS = ("wikitext", "kl")  # perplexity on a text file; teacher–student KL on held-out text
DEFAULT_TASKS = (*TASKS, "wikitext")
SWA_PREFIX = "swa:"

Models = dict[str, tuple[torch.nn.Module, object]]


def default_data_dir() -> Path:
    """$ARWKV_EVAL_DIR, else ../shared/eval next to the repository this package lives in."""
    env = os.environ.get("ARWKV_EVAL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "eval"


def _shown_path(path: Path) -> str:
    """The path as a report shows it: relative to the working directory, so reports carry no machine paths."""
    return os.path.relpath(path) if path.is_absolute() else str(path)


def default_text_file() -> Path:
    return default_data_dir().parent / "assets" / "wikitext2-raw-test" / "wiki.test.raw"


def load_models(
    specs: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    swa_window: int = 64,
    swa_sinks: int = 4,
    dtype: torch.dtype = torch.float32,
) -> Models:
    """Load each spec once: a model folder / checkpoint / .gguf / teacher name, or `swa:<spec>` for the
    sink+window baseline of that teacher (sharing its weights with a plain entry for the same spec)."""
    from arwkv.eval.baselines import SinkWindowBaseline

    cache: dict[str, tuple[torch.nn.Module, object]] = {}
    models: Models = {}
    names = list(names) if names else [default_name(s, swa_window, swa_sinks) for s in specs]
    if len(names) != len(specs) or len(set(names)) != len(names):
        raise ConfigError(f"need one distinct name per model spec; got names {names} for specs {list(specs)}")
    for name, spec in zip(names, specs, strict=True):
        base = spec[len(SWA_PREFIX) :] if spec.startswith(SWA_PREFIX) else spec
        if base not in cache:
            cache[base] = load_model(base, dtype=dtype)
        model, tok = cache[base]
        if tok is None:
            raise CheckpointError(
                f"{base!r} has no tokenizer; text benchmarks need one (save it beside the model)"
            )
        if spec.startswith(SWA_PREFIX):
            model = SinkWindowBaseline(model, window=swa_window, sinks=swa_sinks)
        models[name] = (model, tok)
    return models


def default_name(spec: str, window: int = 64, sinks: int = 4) -> str:
    if spec.startswith(SWA_PREFIX):
        return f"swa{window}+{sinks}({default_name(spec[len(SWA_PREFIX) :])})"
    return Path(spec.rstrip("/")).stem or spec


def _score_task(
    model, tok, task_name: str, data_dir: Path, limit: int | None, batch_size: int, progress: bool
) -> dict[str, dict]:
    task = get_task(task_name)
    docs = task.load(data_dir)[:limit] if limit else task.load(data_dir)
    reqs = [task.requests(d) for d in docs]
    flat = [r for rs in reqs for r in rs]
    res = loglikelihood(model, tok, flat, batch_size=batch_size, progress=progress, desc=task_name)
    per_doc: dict[str, list[float]] = {m: [] for m in task.aggregation}
    i = 0
    for doc, rs in zip(docs, reqs, strict=True):
        values = task.process(doc, res[i : i + len(rs)])
        i += len(rs)
        for m, v in values.items():
            per_doc[m].append(v)
    out = {}
    for metric, how in task.aggregation.items():
        value, stderr = aggregate(per_doc[metric], how)
        out[metric] = {
            "value": value,
            "stderr": stderr,
            "n": len(docs),
            "higher_is_better": task.higher_is_better.get(metric, True),
        }
    return out


def evaluate(
    models: Models,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    reference: str | None = None,
    text_file: str | Path | None = None,
    context_length: int = 512,
    max_tokens: int | None = None,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Score every model on every task. Returns {"results": {model: {task: {metric: {value, stderr, n,
    higher_is_better}}}}, "seconds": {model: {task: s}}, "reference": name, "config": {...}}.

    `limit` takes the first N documents of each set (and caps wikitext/kl at N windows). `reference` (default:
    the first model) is the teacher for retention and for "kl". `on_result` gets the partial dict after each
    (model, task), so long runs can save as they go.
    """
    from arwkv.eval import perplexity

    unknown = [t for t in tasks if t not in TASKS and t not in EXTRA_TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known: {', '.join((*TASKS, *EXTRA_TASKS))}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    reference = reference or next(iter(models))
    if reference not in models:
        raise ConfigError(f"reference model {reference!r} is not among {list(models)}")
    text_path = Path(text_file) if text_file else default_text_file()
    out = {
        "results": {m: {} for m in models},
        "seconds": {m: {} for m in models},
        "cpu_seconds": {m: {} for m in models},
        "reference": reference,
        "config": {
            "tasks": list(tasks),
            "limit": limit,
            "batch_size": batch_size,
            "data_dir": _shown_path(data_dir),
            "text_file": str(text_path),
            "context_length": context_length,
            "max_tokens": max_tokens,
        },
    }
    for task in tasks:
        for name, (model, tok) in models.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            if task == "wikitext":
                r = perplexity.text_perplexity(
                    model,
                    tok,
                    text_path.read_text(encoding="utf-8"),
                    context_length=context_length,
                    max_windows=limit,
                    max_tokens=max_tokens,
                    batch_size=batch_size,
                    progress=progress,
                )
                scores = perplexity.as_metrics(r)
            elif task == "kl":
                if name == reference:
                    continue
                ref_model, _ = models[reference]
                r = perplexity.teacher_student_kl(
                    ref_model,
                    model,
                    tok,
                    text_path.read_text(encoding="utf-8"),
                    context_length=context_length,
                    max_windows=limit,
                    max_tokens=max_tokens,
                    batch_size=batch_size,
                    progress=progress,
                )
                scores = perplexity.as_metrics(r)
            else:
                scores = _score_task(model, tok, task, data_dir, limit, batch_size, progress)
            out["results"][name][task] = scores
            out["seconds"][name][task] = round(time.perf_counter() - start, 2)
            # CPU seconds of this process: the cost on an idle machine when wall time is inflated by sharing.
            out["cpu_seconds"][name][task] = round(time.process_time() - cpu_start, 2)
            if on_result:
                on_result(out)
    return out


@torch.no_grad()
def run_eval(
    model_specs: Sequence[str],
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    out_dir: str | Path = "runs/eval",
    *,
    names: Sequence[str] | None = None,
    reference: str | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    swa_window: int = 64,
    swa_sinks: int = 4,
    text_file: str | Path | None = None,
    context_length: int = 512,
    max_tokens: int | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Load the models, score them, write `eval.md` and `eval.json` in `out_dir`; returns the JSON dict.

    A spec is an HF folder (teacher or arwkv student checkpoint), a .gguf / llama2.c file, a teacher name
    known to `arwkv.convert.teachers` (e.g. smollm2-135m-instruct), or `swa:<spec>` for the sink+window
    baseline.
    The first non-baseline spec is the retention reference unless `reference` names another.
    dtype: the models' weights and compute; float64 makes scores independent of batch size and composition
    (fp32 rounding differs with the matmul shapes, and an untrained student amplifies it to ~1e-2 nats).
    """
    models = load_models(model_specs, names=names, swa_window=swa_window, swa_sinks=swa_sinks, dtype=dtype)
    if reference is None:
        plain = [n for n, s in zip(models, model_specs, strict=True) if not s.startswith(SWA_PREFIX)]
        reference = plain[0] if plain else next(iter(models))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save(partial: dict) -> None:
        partial["config"]["model_specs"] = dict(zip(models, model_specs, strict=True))
        partial["config"]["swa"] = {"window": swa_window, "sinks": swa_sinks}
        report.write(partial, out_dir)

    result = evaluate(
        models,
        tasks,
        limit=limit,
        batch_size=batch_size,
        data_dir=data_dir,
        reference=reference,
        text_file=text_file,
        context_length=context_length,
        max_tokens=max_tokens,
        progress=progress,
        on_result=save,
    )
    save(result)
    return result


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@torch.no_grad()
def run_long_context_eval(
    model_specs: Sequence[str],
    out_dir: str | Path = "runs/eval",
    *,
    names: Sequence[str] | None = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    trials: int = 1,
    text_file: str | Path | None = None,
    context_length: int = 2048,
    max_windows: int | None = 4,
    swa_window: int = 64,
    swa_sinks: int = 4,
    progress: bool = True,
) -> dict:
    """Passkey grid and loss-by-position for each spec; writes long_context.{json,md,png} in `out_dir`."""
    from arwkv.eval.long_context import run_long_context

    models = load_models(model_specs, names=names, swa_window=swa_window, swa_sinks=swa_sinks)
    text = Path(text_file or default_text_file()).read_text(encoding="utf-8")
    return run_long_context(
        models,
        out_dir,
        text=text,
        lengths=lengths,
        depths=depths,
        trials=trials,
        context_length=context_length,
        max_windows=max_windows,
        progress=progress,
    )
