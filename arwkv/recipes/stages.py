"""One stage of a conversion run on the run's data: the loader over the stage's rows, the stage's switches
on the student, and its recipe (`align`, `distill`, `sft`, `dpo`)."""

from __future__ import annotations

from arwkv.config import RecipeConfig, StageConfig
from arwkv.recipes.run_data import RunData, open_teacher_cache
from arwkv.recipes.students import enable_grad_checkpointing
from arwkv.train.distributed import DistEnv
from arwkv.train.loop import LoopResult, micro_batch_size
from arwkv.train.threads import ThreadTuner


def run_stage(
    name: str,
    scfg: StageConfig,
    student,
    teacher,
    distill_teacher,
    data: RunData,
    cfg: RecipeConfig,
    env: DistEnv,
    eval_fn,
    config_yaml: str,
) -> LoopResult:
    """Train stage `name` of the run (resuming its checkpoints) and return the loop's result."""
    from arwkv.data.packing import PackedLoader
    from arwkv.recipes.align import run_align
    from arwkv.recipes.distill import run_distill
    from arwkv.recipes.sft import run_sft

    kw = dict(
        env=env,
        eval_fn=eval_fn,
        bf16=cfg.bf16,
        strategy=cfg.distributed.strategy,
        config_yaml=config_yaml,
        resume=cfg.resume,
        thread_tuner=ThreadTuner() if cfg.thread_tuning and env.device.type == "cpu" else None,
    )
    stage_dir = cfg.run_dir / name
    if name == "dpo":  # preference pairs instead of packed rows (arwkv.recipes.dpo)
        from arwkv.recipes.dpo import run_dpo_stage

        enable_grad_checkpointing(cfg, student)
        return run_dpo_stage(cfg, student, teacher, data.tokenizer, stage_dir, **kw)
    rows = data.rows(name, scfg.seq_len)
    cached = name == "distill" and scfg.teacher_topk > 0
    loader = PackedLoader(
        rows,
        micro_batch_size(scfg, env.world_size),
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        rank=env.rank,
        world_size=env.world_size,
        with_row_ids=cached,
    )
    if name != "align":
        enable_grad_checkpointing(cfg, student)
    if name == "align":
        return run_align(
            student, teacher, loader, scfg, stage_dir, grad_checkpointing=cfg.grad_checkpointing, **kw
        )
    if name == "distill":
        if cached:
            kw["teacher_cache"] = open_teacher_cache(
                cfg, distill_teacher, data.tokenizer, rows, env.rank, corpus=data.corpus
            )
        return run_distill(student, distill_teacher, loader, scfg, stage_dir, **kw)
    return run_sft(student, loader, scfg, stage_dir, **kw)
