"""The `arwkv` command.

    arwkv convert --recipe stories260k [key=value ...]     whole pipeline (teacher → student → report)
    arwkv align|distill|sft|dpo --from PATH [--recipe R]   one stage, starting from a saved student/checkpoint
    arwkv select-layers --recipe R --k K                   which K layers keep softmax attention (measured)
    arwkv generate PATH [PROMPT]                           sample from a student (or any teacher), streamed
    arwkv chat PATH                                        multi-turn chat with the tokenizer's template
    arwkv eval ...                                         benchmark tasks (arwkv.eval)
    arwkv export RUN --to gguf|rwkv_hybrid|hf OUT          a student for llama.cpp / ARWKV / transformers

The same command runs under `torchrun --nproc-per-node N -m arwkv ...` or `accelerate launch -m arwkv ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from arwkv.errors import ArwkvError

LAUNCHER_ENV = "ARWKV_LAUNCHER_PID"  # set by `_launch` for its DDP workers

EXAMPLES = """examples:
  arwkv convert --recipe stories260k
  arwkv convert --recipe smollm2-135m distill.tokens=2e6 out_dir=runs/smol-long
  arwkv convert --recipe my.yaml student.init=fresh align.loss=l2
  arwkv distill --from runs/stories260k/align distill.lr=5e-4
  arwkv dpo --from runs/stories260k/final dpo.beta=0.1 dpo.max_steps=100
  arwkv generate runs/stories260k/final --max-new-tokens 64
  arwkv chat runs/smollm2-135m/final
  arwkv export runs/smollm2-135m --to gguf out/smollm2-rwkv-q8_0.gguf --dtype q8_0
"""


def _recipe_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--recipe",
        required=required,
        metavar="NAME|PATH",
        help="shipped recipe name (stories260k, smollm2-135m, qwen2.5-7b, ...) or a YAML file",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any recipe key, e.g. distill.lr=1e-3 data.train=[a.jsonl,b.txt] out_dir=runs/x",
    )
    p.add_argument("--help-keys", action="store_true", help="list every recipe key with its default and exit")
    p.add_argument("--fresh", action="store_true", help="ignore an earlier run in out_dir (resume=false)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arwkv",
        description="Turn a pretrained Hugging Face Transformer into an RWKV-7 RNN by distillation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from arwkv import __version__

    parser.add_argument("--version", action="version", version=f"arwkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="run the whole pipeline from a recipe",
        description="Load the teacher, build the RWKV-7 student, get data (files, or the teacher "
        "writes it), run align → distill → sft (as enabled), evaluate on held-out data, save "
        "<out_dir>/final and <out_dir>/report.md. Rerunning the same command resumes.",
    )
    _recipe_args(p, required=False)
    p.set_defaults(func=cmd_convert)

    stage_help = {
        "align": "stage 1: teacher-forced attention-output alignment (mixers only)",
        "distill": "stage 2: logit distillation, forward KL over the full vocabulary",
        "sft": "stage 3: supervised fine-tuning on assistant tokens",
        "dpo": "stage 3: DPO on preference pairs (dpo.data files, or teacher-vs-student pairs data-free)",
    }
    for stage, text in stage_help.items():
        p = sub.add_parser(
            stage, help=text, description=f"{text}. Runs only this stage, starting from --from."
        )
        p.add_argument(
            "--from",
            dest="source",
            required=True,
            metavar="PATH",
            help="a saved student (final/), a stage folder (runs/x/align) or a checkpoint (step_…)",
        )
        _recipe_args(p, required=False)
        p.set_defaults(func=cmd_stage, stage=stage)

    p = sub.add_parser(
        "select-layers",
        help="measure which K layers should keep softmax attention (hybrid students)",
        description="A short stage 1 of all layers, then each RWKV mixer swapped into the teacher alone; "
        "layers are ranked by the held-out KL this causes and the K most harmful keep softmax attention. "
        "Writes <out_dir>/select_layers/ranking.{json,md,png}; `student.softmax_layers=auto:K` in a recipe "
        "does the same inside `arwkv convert`.",
    )
    p.add_argument("--k", type=int, default=None, help="softmax budget (default: auto:K of the recipe)")
    _recipe_args(p, required=True)
    p.set_defaults(func=cmd_select_layers)

    for name, text in (("generate", "sample a continuation, streamed"), ("chat", "talk to a model")):
        p = sub.add_parser(
            name,
            help=text,
            description=f"{text.capitalize()} (a student folder or any teacher "
            "spec). Without a tokenizer, prompts and outputs are token ids.",
        )
        p.add_argument("model", help="student folder (runs/x/final) or teacher (HF id/folder, .bin, .gguf)")
        if name == "generate":
            p.add_argument(
                "prompt",
                nargs="?",
                default=None,
                help="prompt text (token ids separated by spaces for a model without tokenizer)",
            )
        else:
            p.add_argument("--system", default=None, help="system message")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=50)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")
        p.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    p = sub.add_parser(
        "eval",
        help="benchmark teacher / student / baselines (arwkv.eval)",
        description="Score models on lm-eval-style tasks and text perplexity in one run and write eval.md / "
        "eval.json. A model is an HF folder (teacher or student), .gguf, llama2.c .bin, a known teacher "
        "name, or swa:<teacher> for the training-free sliding-window + sinks baseline; NAME=MODEL labels it.",
    )
    p.add_argument("models", nargs="+", metavar="[NAME=]MODEL")
    p.add_argument(
        "--tasks", default=None, help="comma-separated tasks (default: all six + wikitext); none: skip them"
    )
    p.add_argument(
        "--passkey",
        default=None,
        metavar="LENGTHS",
        help="also run long context: passkey retrieval at these lengths (e.g. 1024,4096,16384) and loss by "
        "position; writes long_context.{md,json,png}",
    )
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reference", default=None, help="model name retention is relative to (default: first)")
    p.add_argument("--swa-window", type=int, default=64)
    p.add_argument("--swa-sinks", type=int, default=4)
    p.add_argument("--text-file", default=None, help="text for perplexity (default: WikiText-2 test)")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast (about 2x faster on CPUs with bf16 matmuls; scores move in the 3rd digit)",
    )
    p.add_argument(
        "--fp64",
        action="store_true",
        help="score in float64 (~3x slower): log-likelihoods independent of the batch on any BLAS (fp32 "
        "batches are padded so that they match too where the BLAS allows; see lm_eval_tasks/README.md)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        help="the embedded default: convert, evaluate, chat, report (`make demo`)",
        description="Convert with a recipe (default smollm2-135m, ~20 minutes on 2 CPU cores), then score "
        "teacher, student and the sliding-window baseline on the benchmark sets (--limit items each), run "
        "passkey / loss-by-position, let teacher and student answer the same chat prompt, and write "
        "<out_dir>/demo.md. Recipe keys scale it up, e.g. distill.tokens=5e6 device=cuda teacher.path=DIR.",
    )
    _recipe_args(p, required=False)
    p.add_argument("--limit", type=int, default=50, help="items per benchmark set (0: all)")
    p.add_argument("--prompt", default=None, help="the chat prompt both models answer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "export",
        help="write a student for llama.cpp (gguf), the published ARWKV format or transformers (hf)",
        description="Export a run (its final/), a student folder or a published rwkv_hybrid folder to --to, "
        "with its tokenizer and chat template, and check what was written against the student before it "
        "replaces OUT. Every problem (layout, tokenizer, llama.cpp converter, OUT) is listed at once. With "
        "--check nothing is written; SOURCE may then be a recipe (will its student export?). GGUF needs "
        "ARWKV_LLAMACPP_DIR, a llama.cpp source checkout.",
    )
    p.add_argument("source", metavar="SOURCE", help="run folder, student folder, or (with --check) a recipe")
    p.add_argument("out", metavar="OUT", help="folder to write (the .gguf file for --to gguf)")
    p.add_argument("--to", required=True, choices=("gguf", "rwkv_hybrid", "hf"))
    p.add_argument("--dtype", default="f32", choices=("f32", "bf16", "f16", "q8_0"), help="q8_0: gguf only")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    p.add_argument("--check", action="store_true", help="only report what would keep it from exporting")
    p.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder when SOURCE has none (gguf needs one)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override when SOURCE is a recipe, e.g. --set student.mixer.head_size=64",
    )
    p.set_defaults(func=cmd_export)
    return parser


# --------------------------------------------------------------------------------------------- commands


def _load_cfg(args, default_recipe: str | None = None):
    from arwkv.config import load_recipe

    recipe = args.recipe or default_recipe
    if recipe is None:
        raise ArwkvError("give --recipe NAME|PATH (see `arwkv convert --help`)")
    overrides = list(args.overrides)
    if args.fresh:
        overrides.append("resume=false")
    return load_recipe(recipe, overrides)


def _print_keys() -> int:
    import dataclasses

    from arwkv.config import RecipeConfig

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                print(f"{prefix}{f.name} = {v!r}")

    walk(RecipeConfig())
    return 0


def _launch(processes: int, argv: list[str], teacher: str) -> int | None:
    """Re-run this command in `processes` local DDP processes (as torchrun would), unless already in one."""
    if processes <= 1 or "WORLD_SIZE" in os.environ:
        return None
    from arwkv.convert.teachers import check_teacher_spec

    check_teacher_spec(teacher)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    print(f"[arwkv] starting {processes} processes (DDP on this machine)", flush=True)
    # the workers report their own errors (rank 0 only); torchrun's failure records would repeat them
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    launch = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={processes}", "-m", "arwkv", *argv]
    )
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the workers stop when this process dies
    try:
        run(launch)
    except SignalException:  # Ctrl-C / SIGTERM: the workers saved their state and said so (rank 0)
        return 130
    except ChildFailedError as e:  # the workers already printed their message
        return next((f.exitcode for f in e.failures.values() if f.exitcode), 1)
    return 0


def _die_with_launcher() -> None:
    """In a DDP worker of `_launch`: get SIGTERM when the launcher dies (even by kill -9), so that no worker
    keeps training, and holding the run folder, behind a dead command. Linux only (prctl)."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _done(result) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"student: {result.final_dir}\nreport:  {result.run_dir / 'report.md'}")


def cmd_convert(args) -> int:
    if args.help_keys:
        return _print_keys()
    from arwkv.recipes.convert import run

    cfg = _load_cfg(args)
    code = _launch(cfg.processes, args.argv, cfg.teacher.path)
    if code is not None:
        return code
    result = run(cfg)
    _done(result)
    return 0


def cmd_select_layers(args) -> int:
    if args.help_keys:
        return _print_keys()
    from arwkv.recipes.select_layers import SELECT_DIR, run_selection

    cfg = _load_cfg(args)
    result = run_selection(cfg, args.k)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"softmax layers (K={result['k']}): {result['selected']}")
        print(f"evenly spaced would be: {result['evenly_spaced']}")
        print(f"ranking (most harmful first): {result['ranking']}")
        print(f"table:   {cfg.run_dir / SELECT_DIR / 'ranking.md'}")
    return 0


def _recipe_near(source: str) -> str | None:
    """The config.yaml of the run a --from path belongs to (runs/x/align/checkpoints/step_… → runs/x)."""
    for parent in [Path(source), *Path(source).parents]:
        if (parent / "config.yaml").is_file() and (parent / "summary.json").is_file():
            return str(parent / "config.yaml")
    return None


def cmd_stage(args) -> int:
    if args.help_keys:
        return _print_keys()
    from arwkv.recipes.convert import run

    cfg = _load_cfg(args, _recipe_near(args.source))
    getattr(cfg, args.stage).enabled = True
    code = _launch(cfg.processes, args.argv, cfg.teacher.path)
    if code is not None:
        return code
    result = run(cfg, stages=[args.stage], student_from=args.source)
    _done(result)
    return 0


def cmd_generate(args) -> int:
    from arwkv.recipes.generate import cli_generate

    return cli_generate(args)


def cmd_chat(args) -> int:
    from arwkv.recipes.generate import cli_chat

    return cli_chat(args)


def cmd_eval(args) -> int:
    from arwkv.recipes.eval import cli_eval

    return cli_eval(args)


def cmd_demo(args) -> int:
    if args.help_keys:
        return _print_keys()
    from arwkv.recipes.demo import DEFAULT_PROMPT, run_demo

    cfg = _load_cfg(args, "smollm2-135m")
    cfg.processes = 1  # the evaluation phases run in this process
    prompt = args.prompt or DEFAULT_PROMPT
    run_demo(cfg, limit=args.limit or None, prompt=prompt, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_export(args) -> int:
    from arwkv.recipes.export import cli_export

    return cli_export(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; with an explicit argv (tests, notebooks) it returns the exit status instead of exiting."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0 if argv is not None else sys.exit(0)
    from arwkv.train.loop import TrainingInterrupted

    _die_with_launcher()
    try:
        code = args.func(args)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # every DDP process stops: say it once
            print(f"\n[arwkv] {e}", file=sys.stderr)
        code = 130
    except ArwkvError as e:
        if os.environ.get("RANK", "0") == "0":  # every DDP process hits the same bad input: say it once
            print(f"[arwkv] error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("\n[arwkv] aborted", file=sys.stderr)
        code = 130
    if argv is None:  # console script / python -m arwkv: the exit status is the result
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
