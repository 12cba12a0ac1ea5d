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

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arwkv.atomic import write_json, write_text
from arwkv.config import STAGES, RecipeConfig, StageConfig, config_text, load_recipe, to_dict
from arwkv.errors import CheckpointError, ConfigError, DataError
from arwkv.ops.precision import resolve_bf16
from arwkv.train import checkpoint as ckpt
from arwkv.train.distributed import DistEnv, barrier, init_distributed
from arwkv.train.loop import LoopResult, micro_batch_size
from arwkv.train.metrics import heldout_metrics, iter_batches
from arwkv.train.threads import ThreadTuner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertResult:
    run_dir: Path
    final_dir: Path | None
    summary: dict[str, Any]


def _say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(f"[arwkv] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- models


def load_teacher_model(path: str, dtype: str, device: torch.device, tokenizer_path: str | None = None):
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


# ------------------------------------------------------------------------------------------------- data


@dataclass
class RunData:
    """Where each stage's rows come from, and the held-out batches."""

    cfg: RecipeConfig
    teacher: nn.Module
    tokenizer: Any
    corpus: Any  # TeacherCorpus in data-free mode, else None
    heldout: dict[str, torch.Tensor]
    sampling_s: float = 0.0

    def rows(self, stage: str, seq_len: int):
        """PackedCorpus for a stage at its sequence length (cached on disk for file data)."""
        d = self.cfg.data
        sources = d.sft if stage == "sft" and d.sft else d.train
        if sources and d.teacher_fraction > 0 and stage != "sft" and self.corpus is not None:
            from arwkv.data.packing import MixedCorpus

            written = self.corpus.packed("train", seq_len=seq_len, pad_id=_pad_id(self.tokenizer))
            return MixedCorpus(written, self._file_rows(sources, seq_len), d.teacher_fraction)
        if not sources:
            if self.corpus is None:
                raise DataError(
                    "no training data: give data.train files or leave it empty for data-free mode"
                )
            return self.corpus.packed(
                "train", seq_len=seq_len, reply_only=stage == "sft" and d.chat, pad_id=_pad_id(self.tokenizer)
            )
        return self._file_rows(sources, seq_len)

    def _file_rows(self, sources: list[str], seq_len: int):
        d = self.cfg.data
        if self.tokenizer is None:
            raise DataError(
                "data files need the teacher's tokenizer; this teacher has none (use data-free mode "
                "with data.train=[] or set teacher.tokenizer)"
            )
        from arwkv.data.packing import build_corpus

        return build_corpus(
            sources,
            self.tokenizer,
            seq_len,
            teacher=self.teacher,
            text_field=d.text_field,
            cache_dir=_cache_dir(self.cfg, "data"),
            progress=_is_main(),
        )


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def _cache_dir(cfg: RecipeConfig, kind: str) -> Path:
    if kind == "teacher_corpus" and cfg.data.data_free.cache_dir:
        return Path(cfg.data.data_free.cache_dir)
    return cfg.run_dir.parent / ".cache" / kind


def _concat_corpora(parts: list):
    """One TeacherCorpus from shards (training rows concatenated; the held-out set is shard 0's)."""
    import dataclasses

    first = parts[0]
    width = max(p.train.shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return dataclasses.replace(
        first,
        train=torch.cat([pad(p.train) for p in parts]),
        train_lengths=torch.cat([p.train_lengths for p in parts]),
        train_prompt_lengths=torch.cat([p.train_prompt_lengths for p in parts]),
        meta={**first.meta, "shards": len(parts)},
    )


def _heldout_from_corpus(corpus, n: int) -> dict[str, torch.Tensor]:
    """One sampled sequence per row, right-padded: no packing, so every baseline sees whole documents."""
    ids, lengths = corpus.heldout[:n], corpus.heldout_lengths[:n]
    t = ids.shape[1]
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.arange(t).expand_as(ids).contiguous(),
    }


@contextlib.contextmanager
def _threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prepare_data(cfg: RecipeConfig, teacher: nn.Module, tokenizer, env: DistEnv) -> RunData:
    """Training corpus and held-out set.

    Data-free: the teacher samples `data_free.shards` shards (shard k with seed + 1000k, the held-out set in
    shard 0); processes share them out and fill the cache, then everyone reads every shard from the cache, so
    the corpus does not depend on the number of processes.
    """
    from arwkv.data.teacher_corpus import teacher_corpus

    d, h = cfg.data, cfg.data.heldout
    t0 = time.perf_counter()

    def sample(num_train: int, num_heldout: int, seq_len: int, shards: int = 1):
        def shard(k: int, progress: bool):
            per = num_train // shards + (1 if k < num_train % shards else 0)
            return teacher_corpus(
                teacher,
                num_train=per,
                num_heldout=num_heldout if k == 0 else 0,
                seq_len=seq_len,
                mode=d.data_free.prompts,
                tokenizer=tokenizer,
                temperature=d.data_free.temperature,
                top_k=d.data_free.top_k,
                batch_size=d.data_free.batch_size,
                seed=cfg.seed + 1000 * k,
                cache_dir=_cache_dir(cfg, "teacher_corpus"),
                progress=progress,
            )

        mine = list(range(env.rank, shards, env.world_size))
        idle = env.world_size - min(shards, env.world_size)  # processes with no shard lend their cores
        with _threads(torch.get_num_threads() * (1 + idle) if env.is_main else torch.get_num_threads()):
            # a bf16 run samples in bf16 too (about twice as fast on CPUs with bf16 matmuls)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                for k in mine:
                    shard(k, progress=env.is_main)
        barrier()
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            parts = [shard(k, progress=False) for k in range(shards)]  # cache hits
        return parts[0] if shards == 1 else _concat_corpora(parts)

    corpus, heldout = None, None
    same_len = h.seq_len == d.data_free.seq_len
    if not d.train or d.teacher_fraction > 0:
        n_held = h.num_sequences if h.source == "teacher" and same_len else 0
        corpus = sample(d.data_free.num_sequences, n_held, d.data_free.seq_len, d.data_free.shards)
        if n_held:
            heldout = _heldout_from_corpus(corpus, h.num_sequences)
    if heldout is None:
        if h.source == "teacher":
            heldout = _heldout_from_corpus(sample(0, h.num_sequences, h.seq_len), h.num_sequences)
        else:
            if tokenizer is None:
                raise DataError(
                    "a held-out file needs the teacher's tokenizer; use data.heldout.source=teacher"
                )
            from arwkv.data.packing import build_corpus

            rows = build_corpus(
                h.source,
                tokenizer,
                h.seq_len,
                teacher=teacher,
                cache_dir=_cache_dir(cfg, "data"),
                progress=env.is_main,
            )
            heldout = rows.batch(list(range(min(h.num_sequences, len(rows)))))
    return RunData(cfg, teacher, tokenizer, corpus, heldout, sampling_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ stages


def _run_stage(
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

        _checkpoint_layers(cfg, student)
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
        _checkpoint_layers(cfg, student)
    if name == "align":
        return run_align(
            student, teacher, loader, scfg, stage_dir, grad_checkpointing=cfg.grad_checkpointing, **kw
        )
    if name == "distill":
        if cached:
            kw["teacher_cache"] = open_teacher_cache(cfg, distill_teacher, data.tokenizer, rows, env.rank)
        return run_distill(student, distill_teacher, loader, scfg, stage_dir, **kw)
    return run_sft(student, loader, scfg, stage_dir, **kw)


def _checkpoint_layers(cfg: RecipeConfig, student: nn.Module) -> None:
    if cfg.grad_checkpointing:
        # recompute each decoder layer in backward (transformers >= 5.x renamed the switch)
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _apply_budget(cfg, stages, summary, student, teacher, distill_teacher, data, env: DistEnv) -> None:
    """Set each stage's `tokens` from `budget.minutes` (plan measured once, kept in budget.json)."""
    from arwkv.recipes.budget import PLAN_FILE, plan_tokens, stage_shares

    finished = {s for s in stages if summary["stages"].get(s, {}).get("done")}
    shares = stage_shares(stages, cfg.budget.align_share, cfg.budget.sft_share)
    if env.is_main:
        measure = lambda s: _stage_rate(s, student, teacher, distill_teacher, data, cfg, env)  # noqa: E731
        plan = plan_tokens(cfg.run_dir, cfg.budget.minutes, stages, shares, measure, finished)
    barrier()
    if not env.is_main:
        plan = {**json.loads((cfg.run_dir / PLAN_FILE).read_text()), "reopened": []}
        plan["reopened"] = [s for s in stages if s in finished and not _stage_complete(cfg, s, plan)]
    for s, n in plan["tokens"].items():
        getattr(cfg, s).tokens = int(n)
    for s in plan["reopened"]:
        summary["stages"][s]["done"] = False  # resumes from its checkpoint with the longer budget
    summary["budget"] = {k: v for k, v in plan.items() if k != "reopened"}
    _say(
        env,
        f"budget {cfg.budget.minutes:g} min: "
        + ", ".join(f"{s} {plan['tokens'][s]:,} tokens at {plan['rates'][s]:.0f} tok/s" for s in stages)
        + (f" (extended: {', '.join(plan['reopened'])} continues)" if plan["reopened"] else ""),
    )


def _stage_complete(cfg: RecipeConfig, stage: str, plan: dict) -> bool:
    """A finished stage whose last checkpoint already holds the planned tokens."""
    last = ckpt.latest_intact_checkpoint(cfg.run_dir / stage / "checkpoints", warn=False)
    if last is None:
        return False
    state = json.loads((last / "trainer_state.json").read_text())
    return int(state.get("tokens", 0)) >= int(plan["tokens"][stage])


def _stage_rate(name: str, student, teacher, distill_teacher, data: RunData, cfg: RecipeConfig, env) -> float:
    """Tokens/s of one stage's forward + backward on its own rows (two micro-batches; gradients dropped)."""
    from arwkv.data.packing import PackedLoader
    from arwkv.recipes.align import AlignTask
    from arwkv.recipes.budget import measure_rate
    from arwkv.recipes.distill import DistillTask
    from arwkv.recipes.sft import SFTTask
    from arwkv.train.params import param_groups

    scfg: StageConfig = getattr(cfg, name)
    rows = data.rows(name, scfg.seq_len)
    cached = name == "distill" and scfg.teacher_topk > 0
    # another seed than training, so the rows the probe puts into the teacher cache are a random few
    loader = PackedLoader(
        rows, micro_batch_size(scfg, env.world_size), seed=cfg.seed + 7919, with_row_ids=cached
    )
    if name == "align":
        param_groups(student, scfg.lr, only=["mixers"])
        task = AlignTask(student, teacher, loss=scfg.loss)
    elif name == "distill":
        param_groups(student, scfg.lr, freeze=scfg.freeze)
        cache = open_teacher_cache(cfg, distill_teacher, data.tokenizer, rows, env.rank) if cached else None
        task = DistillTask(student, distill_teacher, scfg.kl_temperature, scfg.ce_weight, cache=cache)
    else:
        param_groups(student, scfg.lr, freeze=scfg.freeze)
        task = SFTTask(student, scfg.chunk_size)

    def step() -> int:
        batch = {k: v.to(env.device) for k, v in next(loader).items()}
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, _, _ = task(batch)
        loss.float().backward()
        student.zero_grad(set_to_none=True)
        return int(batch["input_ids"].numel())

    _say(env, f"budget: measuring {name} throughput")
    rng = ckpt.rng_state()
    try:
        return measure_rate(step) * env.world_size  # processes run side by side
    finally:
        ckpt.set_rng_state(rng)  # the probe must not shift the training run's randomness


def open_teacher_cache(cfg: RecipeConfig, teacher: nn.Module, tokenizer, rows, rank: int = 0):
    """The stage-2 teacher cache for these rows, keyed by teacher weights, tokenizer, data, k, T and the
    compute dtype (bf16 autocast gives slightly different log-probs than fp32)."""
    from arwkv.data.packing import tokenizer_fingerprint
    from arwkv.data.teacher_cache import TeacherCache
    from arwkv.data.teacher_corpus import teacher_fingerprint

    key = {
        "teacher": teacher_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
        "data": rows.base_fingerprint,
        "temperature": float(cfg.distill.kl_temperature),
        "compute": "bf16" if cfg.bf16 else str(next(teacher.parameters()).dtype),
    }
    return TeacherCache.open(
        _cache_dir(cfg, "teacher_topk"),
        key,
        num_rows=rows.num_base_rows,
        seq_len=rows.seq_len,
        k=cfg.distill.teacher_topk,
        rank=rank,
    )


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on `<run_dir>/.lock`, or CheckpointError naming the process that holds it."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")  # noqa: SIM115  (kept open: the lock lives as long as the file)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CheckpointError(
            f"{run_dir} is in use by {holder} (a conversion, or DDP workers of a killed launcher, still "
            "writing to it); wait for it or stop it, then rerun — two writers would corrupt the run"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


def run(cfg: RecipeConfig, stages: list[str] | None = None, student_from: str | None = None) -> ConvertResult:
    """Run the recipe's enabled stages (or `stages`) and write the student and the report."""
    # one writer per run folder: the lock lives while this runs (the kernel drops it even on kill -9)
    lock = _lock_run_dir(cfg.run_dir) if _is_main() else None
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
        _say(env, precision_note)
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    stages = [s for s in (stages or STAGES) if stages or getattr(cfg, s).enabled]
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    # config.yaml and summary["config"] change only once this run is accepted (after the data, the caches and
    # the budget plan agreed with what the folder holds): a refused rerun leaves the run's record as it was
    config_yaml = config_text(cfg)
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = (
        json.loads(summary_path.read_text()) if cfg.resume and summary_path.is_file() else {}
    )
    summary.setdefault("stages", {})
    summary.setdefault("config", to_dict(cfg))

    _say(env, f"loading teacher {cfg.teacher.path}")
    teacher, tokenizer = load_teacher_model(
        cfg.teacher.path, cfg.teacher.dtype, env.device, cfg.teacher.tokenizer
    )
    distill_teacher = teacher
    if cfg.teacher.distill_path and "distill" in stages:
        _say(env, f"loading the stage-2 teacher {cfg.teacher.distill_path}")
        distill_teacher, _ = load_teacher_model(cfg.teacher.distill_path, cfg.teacher.dtype, env.device)
    if "dpo" in stages and cfg.dpo.data:  # bad preference files fail now, not after the data is sampled
        from arwkv.data.packing import teacher_vocab_size
        from arwkv.data.preferences import load_preferences

        load_preferences(cfg.dpo.data, tokenizer, cfg.dpo.seq_len, vocab=teacher_vocab_size(teacher))
    data = None
    from arwkv.recipes.select_layers import auto_k

    k = auto_k(cfg.student.softmax_layers)
    if k is not None:  # softmax_layers: auto:K — measured once per run folder (select_layers/ranking.json)
        from arwkv.recipes.select_layers import select_layers

        data = prepare_data(cfg, teacher, tokenizer, env)
        selection = select_layers(cfg, teacher, data, env, k)
        cfg.student.softmax_layers = list(selection["selected"])
        config_yaml = config_text(cfg)  # the run records the layers it trains with
        summary["layer_selection"] = {
            key: selection[key] for key in ("k", "selected", "evenly_spaced", "ranking", "cost")
        }
        _say(
            env,
            f"select-layers: K={k} softmax layers {selection['selected']} (ranking {selection['ranking']})",
        )
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

    # the teacher's held-out hidden states never change: computed once, when they fit in 2 GB
    n_tok, width = int(data.heldout["input_ids"].numel()), int(teacher.config.hidden_size)
    teacher_cache: dict[int, torch.Tensor] | None = {} if n_tok * width * 4 < 2**31 else None

    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                batches = iter_batches(data.heldout, cfg.data.heldout.batch_size)
                return heldout_metrics(
                    model,
                    teacher,
                    batches,
                    confident_p=cfg.eval.confident_p,
                    device=env.device,
                    teacher_cache=teacher_cache,
                )
        finally:
            model.train(was)

    if "baselines" not in summary:
        summary["baselines"] = _baselines(cfg, teacher, student, data, evaluate, env)
        if env.is_main:
            write_json(summary_path, summary)

    budgeted = [s for s in stages if s != "dpo"]  # dpo keeps its own steps (pairs, not packed rows)
    if cfg.budget.minutes > 0 and budgeted:
        _apply_budget(cfg, budgeted, summary, student, teacher, distill_teacher, data, env)
        if env.is_main:
            write_json(summary_path, summary)

    summary["config"] = to_dict(cfg)  # accepted: record the settings this run trains with
    if env.is_main:
        write_text(run_dir / "config.yaml", config_yaml)
        write_json(summary_path, summary)
    minutes_before, last_after = 0.0, summary["baselines"].get("student_init")
    for name in stages:
        scfg: StageConfig = getattr(cfg, name)
        done = summary["stages"].get(name)
        if done and done.get("done"):
            _say(env, f"{name}: already done, restoring its final state")
            changed = [k for k, v in to_dict(scfg).items() if done.get("config", {}).get(k, v) != v]
            if changed:
                _say(
                    env,
                    f"{name}: note: {', '.join(changed)} changed since it ran; the finished stage is "
                    "kept (use another out_dir, or --fresh, to train it again)",
                )
            restore_student(student, Path(done["checkpoint"]))
            minutes_before += done["wall_s"] / 60
            last_after = done["after"]
            continue
        before = summary["stages"].get(name, {}).get("before") or last_after or evaluate(student)
        summary["stages"][name] = {"before": before, "done": False, "minutes_before": minutes_before}
        if env.is_main:
            write_json(summary_path, summary)
        _say(env, f"{name}: {scfg.tokens:,} tokens, batch {scfg.batch_size} x {scfg.seq_len}, lr {scfg.lr:g}")
        res = _run_stage(
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
        _say(
            env,
            f"{name}: done in {res.wall_s / 60:.1f} min, {res.tokens_per_s:,.0f} tok/s; held-out "
            + ", ".join(f"{k} {after[k]:.4g}" for k in ("nll_ratio", "kl", "top1") if k in after),
        )
        if env.is_main:
            write_json(summary_path, summary)

    final_dir = run_dir / "final"
    full = _full_state(student)  # collective when the student is sharded (FSDP)
    if env.is_main:
        student.save_pretrained(final_dir, state_dict=full)
        if tokenizer is not None:
            tokenizer.save_pretrained(final_dir)
        summary["total_wall_s"] = summary.get("total_wall_s", 0.0) + (time.perf_counter() - t_start)
        write_json(summary_path, summary)
        from arwkv.recipes.report import write_report

        write_report(run_dir, summary)
        _say(env, f"student saved in {final_dir}; report in {run_dir / 'report.md'}")
    barrier()
    return ConvertResult(run_dir, final_dir, summary)


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _baselines(cfg: RecipeConfig, teacher, student, data: RunData, evaluate, env: DistEnv) -> dict[str, Any]:
    """Held-out metrics of the teacher itself, the untrained student and the training-free SWA baseline."""
    _say(env, "held-out baselines: teacher, untrained student, sliding window + sinks")
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
