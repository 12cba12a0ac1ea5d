"""The embedded default (`arwkv demo`, `make demo`): convert, evaluate, talk, report.

1. `convert` with a recipe (default smollm2-135m: the teacher writes its own chat data; resumable),
2. `eval` of teacher, student and the training-free sliding-window + sinks baseline on the local benchmark
   sets (`--limit` items each) and WikiText perplexity, plus teacher–student KL,
3. passkey retrieval and loss by position (long context) for the same three models,
4. teacher and student answer the same chat prompt (greedy),
5. `<run>/demo.md` ties it together beside the conversion's report.md and the plots.

Every phase writes its own files, so a second run after an interruption resumes the conversion and redoes only
the (short) evaluation phases.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from arwkv.config import RecipeConfig
from arwkv.loading import pad_token_id
from arwkv.recipes.convert import ConvertResult, run_recipe

DEMO_TASKS = ("lambada_openai", "arc_easy", "piqa", "hellaswag", "winogrande", "blimp", "wikitext")
DEFAULT_PROMPT = "Give me three tips for staying focused while studying."
# What the long CPU conversion of the same teacher reached (docs/results/smollm2-135m-long/, measured on 2 CPU
# cores); stated in every demo report so a reader knows what more training buys.
LONG_RUN = """## What a longer conversion reaches

This demo trains on ~7 x 10^4 tokens. The long CPU conversion of the same teacher, `arwkv convert --recipe
smollm2-135m-long` ({minutes} min on 2 CPU cores: {tokens} training tokens of real text mixed with teacher
chat), reached a held-out NLL ratio of **{ratio}** (training-free SWA(64)+4 sinks: {swa}; this teacher: 1) but
a WikiText-2 perplexity at 2048-token windows of **{wt_student}** (SWA {wt_swa}, teacher {wt_teacher}): it
keeps the chat it was distilled on, not yet real text. Figures and plots: `docs/results/smollm2-135m-long/`
in the arwkv repository. To go further on the same run folder: `arwkv convert --recipe smollm2-135m-long
budget.minutes=...` plans the stages from measured throughput and extends a finished run. The structural
variant `smollm2-135m-local` (a 64-token local softmax window + 4 sinks inside every mixer, beside the RWKV
state; constant memory) reached ratio {local_ratio} and WikiText-2 ppl@2048 {wt_local}, below SWA's, at half
the stage-2 tokens (`docs/results/smollm2-135m-local/`).
"""
LONG_RUN_FIGURES = {
    "minutes": "~95",
    "tokens": "561k",
    "ratio": "1.246",
    "swa": "1.034",
    "wt_student": "192",
    "wt_swa": "40.8",
    "wt_teacher": "21.1",
    "local_ratio": "1.030",
    "wt_local": "40.2",
}
NAMES = ("teacher", "student", "swa")


def chat_reply(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's greedy reply to one user message (with the chat template; plain text without one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(prompt)["input_ids"]
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    pad = pad_token_id(tokenizer)
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True).strip()


def _section(path: Path, title: str) -> str:
    """A generated markdown file, inlined under `title` with its own top-level heading dropped."""
    if not path.is_file():
        return f"## {title}\n\n(not produced: {path.name} is missing)\n"
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# ")]
    return f"## {title}\n\n" + "\n".join(lines).strip() + "\n"


def run_demo(
    recipe: RecipeConfig | str | Path = "smollm2-135m",
    overrides: Sequence[str] = (),
    *,
    limit: int | None = 50,
    tasks: Sequence[str] = DEMO_TASKS,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 64,
    passkey_lengths: Sequence[int] = (512, 1024, 2048),
    progress: bool = True,
) -> Path:
    """Run the five phases; returns the path of demo.md."""
    from arwkv.eval.harness import SWA_PREFIX, load_models, run_eval, run_long_context_eval

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    result: ConvertResult = run_recipe(recipe, list(overrides))
    timings["convert (this invocation)"] = time.perf_counter() - t0
    run_dir = result.run_dir
    if result.final_dir is None:
        raise RuntimeError(f"the conversion in {run_dir} produced no final student")
    teacher = result.summary["config"]["teacher"]["path"]
    specs = [teacher, str(result.final_dir), SWA_PREFIX + teacher]
    eval_dir = run_dir / "eval"

    print(
        f"[arwkv] demo: benchmarks (limit {limit}) for teacher, student, sliding-window baseline", flush=True
    )
    t = time.perf_counter()
    # with a limit, WikiText perplexity reads its first 16 windows of 512 tokens (all: ~5 CPU-minutes)
    max_tokens = None if limit is None else 16 * 512
    run_eval(
        specs,
        tasks,
        limit=limit,
        out_dir=eval_dir,
        names=list(NAMES),
        max_tokens=max_tokens,
        progress=progress,
    )
    timings["benchmarks"] = time.perf_counter() - t

    print("[arwkv] demo: passkey retrieval and loss by position", flush=True)
    t = time.perf_counter()
    run_long_context_eval(
        specs,
        eval_dir,
        names=list(NAMES),
        lengths=tuple(passkey_lengths),
        context_length=max(passkey_lengths),
        max_windows=2,
        progress=progress,
    )
    timings["long context"] = time.perf_counter() - t

    print("[arwkv] demo: teacher and student answer the same prompt", flush=True)
    t = time.perf_counter()
    models = load_models(specs[:2], names=list(NAMES[:2]))
    answers = {name: chat_reply(m, tok, prompt, max_new_tokens) for name, (m, tok) in models.items()}
    timings["chat"] = time.perf_counter() - t
    for name, text in answers.items():
        print(f"\n--- {name} ---\n{text}", flush=True)

    total = result.summary.get("total_wall_s", 0.0) + sum(
        v for k, v in timings.items() if k != "convert (this invocation)"
    )
    lines = [
        f"# arwkv demo: {teacher} → RWKV-7 student",
        "",
        f"Run folder `{run_dir}`; conversion details, curves, held-out metrics: [report.md](report.md).",
        f"Benchmarks use the first {limit} items of each set (`--limit`): standard errors are large.",
        "",
        "## Same prompt, both models (greedy)",
        "",
        f"> {prompt}",
        "",
    ]
    for name, text in answers.items():
        lines += [f"**{name}**:", "", "```text", text or "(empty)", "```", ""]
    lines += [
        _section(eval_dir / "eval.md", "Benchmarks"),
        _section(eval_dir / "long_context.md", "Long context"),
        "![passkey and loss by position](eval/long_context.png)",
        "",
        "## Time",
        "",
        "| phase | minutes |",
        "| --- | ---: |",
        f"| conversion (all runs, sampling included) | {result.summary.get('total_wall_s', 0.0) / 60:.1f} |",
        *(f"| {k} | {v / 60:.1f} |" for k, v in timings.items() if k != "convert (this invocation)"),
        f"| total | {total / 60:.1f} |",
        "",
    ]
    if LONG_RUN_FIGURES:
        lines += [LONG_RUN.format(**LONG_RUN_FIGURES)]
    out = run_dir / "demo.md"
    out.write_text("\n".join(lines))
    print(f"\n[arwkv] demo report: {out}", flush=True)
    return out
