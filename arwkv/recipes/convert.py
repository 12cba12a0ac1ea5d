"""The whole conversion, in order (nanochat's speedrun as one function):

    load teacher → build student → data (files, or the teacher writes it) → held-out baselines
    → stage 1 align → stage 2 distill → stage 3 sft and/or dpo (optional) → save the student (HF folder)
    → report.md

Every phase records its results in `<run>/summary.json` and every stage checkpoints atomically, so running
the same command again after a crash, Ctrl-C or a full disk continues where it stopped: finished stages are
restored from their last checkpoint and skipped, the interrupted one resumes exactly.

Run layout:
    config.yaml            resolved recipe                summary.json   results so far
    align/ distill/ sft/   metrics.jsonl, checkpoints/    final/         the student (save_pretrained)
    dpo/                   + pairs.json, dpo_curves.png
    report.md, *.png       the report
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arwkv.atomic import write_text
from arwkv.config import STAGES, RecipeConfig, StageConfig, config_text, load_recipe, to_dict
from arwkv.ops.precision import resolve_bf16
from arwkv.recipes.budget import apply_budget
from arwkv.recipes.run_data import RunData, heldout_evaluator, is_main_process, prepare_data
from arwkv.recipes.select_layers import apply_auto_layers
from arwkv.recipes.stages import run_stage
from arwkv.recipes.students import (
    build_student_for,
    full_state_dict,
    load_student,
    load_teacher_model,
    restore_student,
)
from arwkv.train.distributed import DistEnv, barrier, init_distributed, say
from arwkv.train.run_state import finished_stage, load_summary, lock_run_dir, write_summary


@dataclass
class ConvertResult:
    run_dir: Path
    final_dir: Path | None
    summary: dict[str, Any]


def run(cfg: RecipeConfig, stages: list[str] | None = None, student_from: str | None = None) -> ConvertResult:
    """Run the recipe's enabled stages (or `stages`) and write the student and the report."""
    # one writer per run folder: the lock lives while this runs (the kernel drops it even on kill -9)
    lock = lock_run_dir(cfg.run_dir) if is_main_process() else None
    try:
        return _run(cfg, stages, student_from)
    finally:
        if lock is not None:
            lock.close()


def _run(cfg: RecipeConfig, stages: list[str] | None, student_from: str | None) -> ConvertResult:
    t_start = time.perf_counter()
    env = init_distributed(cfg.device, cfg.distributed.backend)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # bf16=auto becomes what this device runs fast; the run records (and its caches are keyed by) the choice
    bf16, precision_note = resolve_bf16(cfg.bf16, env.device)
    cfg = dataclasses.replace(cfg, bf16=bf16)
    if precision_note:
        say(env, precision_note)
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    stages = [s for s in (stages or STAGES) if stages or getattr(cfg, s).enabled]
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    # config.yaml and summary["config"] change only once this run is accepted (after the data, the caches and
    # the budget plan agreed with what the folder holds): a refused rerun leaves the run's record as it was
    summary = load_summary(run_dir, cfg.resume, to_dict(cfg))

    say(env, f"loading teacher {cfg.teacher.path}")
    teacher, tokenizer = load_teacher_model(
        cfg.teacher.path, cfg.teacher.dtype, env.device, cfg.teacher.tokenizer
    )
    distill_teacher = teacher
    if cfg.teacher.distill_path and "distill" in stages:
        say(env, f"loading the stage-2 teacher {cfg.teacher.distill_path}")
        distill_teacher, _ = load_teacher_model(cfg.teacher.distill_path, cfg.teacher.dtype, env.device)
    if "dpo" in stages and cfg.dpo.data:  # bad preference files fail now, not after the data is sampled
        from arwkv.data.packing import teacher_vocab_size
        from arwkv.data.preferences import load_preferences

        load_preferences(cfg.dpo.data, tokenizer, cfg.dpo.seq_len, vocab=teacher_vocab_size(teacher))
    data = apply_auto_layers(cfg, teacher, tokenizer, env, summary)  # softmax_layers: auto:K
    config_yaml = config_text(cfg)  # the run records the layers it trains with
    from_path = student_from or cfg.student.from_checkpoint
    student = load_student(from_path, cfg, teacher) if from_path else build_student_for(cfg, teacher)
    student.to(env.device)
    summary["models"] = {
        "teacher": cfg.teacher.path,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "untied_lm_head": not bool(getattr(student.config, "tie_word_embeddings", False)),
        "init": cfg.student.init if not from_path else f"from {from_path}",
    }

    if data is None:
        data = prepare_data(cfg, teacher, tokenizer, env)
    summary.setdefault("sampling_s", data.sampling_s)
    n_held = int(data.heldout["input_ids"].shape[0])
    summary["heldout"] = {"sequences": n_held, "seq_len": int(data.heldout["input_ids"].shape[1])}

    evaluate = heldout_evaluator(cfg, teacher, data, env)

    if "baselines" not in summary:
        summary["baselines"] = _baselines(cfg, teacher, student, data, evaluate, env)
        if env.is_main:
            write_summary(run_dir, summary)

    budgeted = [s for s in stages if s != "dpo"]  # dpo keeps its own steps (pairs, not packed rows)
    if cfg.budget.minutes > 0 and budgeted:
        apply_budget(cfg, budgeted, summary, student, teacher, distill_teacher, data, env)
        if env.is_main:
            write_summary(run_dir, summary)

    summary["config"] = to_dict(cfg)  # accepted: record the settings this run trains with
    if env.is_main:
        write_text(run_dir / "config.yaml", config_yaml)
        write_summary(run_dir, summary)
    minutes_before, last_after = 0.0, summary["baselines"].get("student_init")
    for name in stages:
        scfg: StageConfig = getattr(cfg, name)
        done = finished_stage(summary, name, to_dict(scfg), lambda msg: say(env, msg))
        if done:
            restore_student(student, Path(done["checkpoint"]))
            minutes_before += done["wall_s"] / 60
            last_after = done["after"]
            continue
        before = summary["stages"].get(name, {}).get("before") or last_after or evaluate(student)
        summary["stages"][name] = {"before": before, "done": False, "minutes_before": minutes_before}
        if env.is_main:
            write_summary(run_dir, summary)
        say(env, f"{name}: {scfg.tokens:,} tokens, batch {scfg.batch_size} x {scfg.seq_len}, lr {scfg.lr:g}")
        res = run_stage(
            name,
            scfg,
            student,
            teacher,
            distill_teacher,
            data,
            cfg,
            env,
            lambda task: evaluate(task.student),
            config_yaml,
        )
        after = evaluate(student)
        pairs_file = cfg.run_dir / name / "pairs.json"
        if name == "dpo" and pairs_file.is_file():  # held-out preference pairs before / after
            summary["stages"][name]["pairs"] = json.loads(pairs_file.read_text())
        summary["stages"][name].update(
            done=True,
            after=after,
            steps=res.steps,
            tokens=res.tokens,
            wall_s=res.wall_s,
            tokens_per_s=res.tokens_per_s,
            final_loss=res.final_loss,
            checkpoint=str(res.checkpoint),
            lr=scfg.lr,
            mixer_lr=scfg.mixer_lr,
            loss=scfg.loss,
            config=to_dict(scfg),
        )
        minutes_before += res.wall_s / 60
        last_after = after
        say(
            env,
            f"{name}: done in {res.wall_s / 60:.1f} min, {res.tokens_per_s:,.0f} tok/s; held-out "
            + ", ".join(f"{k} {after[k]:.4g}" for k in ("nll_ratio", "kl", "top1") if k in after),
        )
        if env.is_main:
            write_summary(run_dir, summary)

    final_dir = run_dir / "final"
    full = full_state_dict(student)  # collective when the student is sharded (FSDP)
    if env.is_main:
        student.save_pretrained(final_dir, state_dict=full)
        if tokenizer is not None:
            tokenizer.save_pretrained(final_dir)
        summary["total_wall_s"] = summary.get("total_wall_s", 0.0) + (time.perf_counter() - t_start)
        write_summary(run_dir, summary)
        from arwkv.recipes.report import write_report

        write_report(run_dir, summary)
        say(env, f"student saved in {final_dir}; report in {run_dir / 'report.md'}")
    barrier()
    return ConvertResult(run_dir, final_dir, summary)


def _baselines(cfg: RecipeConfig, teacher, student, data: RunData, evaluate, env: DistEnv) -> dict[str, Any]:
    """Held-out metrics of the teacher itself, the untrained student and the training-free SWA baseline."""
    say(env, "held-out baselines: teacher, untrained student, sliding window + sinks")
    out = {"teacher": evaluate(teacher), "student_init": evaluate(student)}
    if cfg.eval.swa_baseline:
        try:
            from arwkv.eval.baselines import SinkWindowBaseline

            out["swa"] = evaluate(SinkWindowBaseline(teacher, cfg.eval.swa_window, cfg.eval.swa_sinks))
            out["swa"]["window"], out["swa"]["sinks"] = cfg.eval.swa_window, cfg.eval.swa_sinks
        except ImportError:  # an older arwkv.eval without the baseline
            pass
    return out


def run_recipe(recipe: RecipeConfig | str | Path, overrides: list[str] | None = None) -> ConvertResult:
    """Whole pipeline from a recipe name, YAML path or RecipeConfig (+ `key=value` overrides).

    >>> from arwkv import run_recipe
    >>> result = run_recipe("stories260k", ["distill.tokens=1e6"])
    >>> result.final_dir   # runs/stories260k/final
    """
    cfg = recipe if isinstance(recipe, RecipeConfig) else load_recipe(recipe, overrides)
    if isinstance(recipe, RecipeConfig) and overrides:
        from arwkv.config import apply_overrides

        apply_overrides(cfg, overrides)
    return run(cfg)
