"""The data side of a run: each stage's training rows (files, teacher-written chat, or both mixed), the
held-out set, and the stage-2 teacher cache. It reads the recipe's `data:` section, so it lives in recipes/
rather than in `arwkv.data` (which may not import the recipe schema)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from arwkv.config import RecipeConfig
from arwkv.errors import DataError
from arwkv.loading import pad_token_id
from arwkv.train.distributed import DistEnv, barrier
from arwkv.train.metrics import heldout_metrics, iter_batches

if TYPE_CHECKING:
    from arwkv.data.teacher_cache import TeacherCache


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

            written = self.corpus.packed("train", seq_len=seq_len, pad_id=pad_token_id(self.tokenizer))
            return MixedCorpus(written, self._file_rows(sources, seq_len), d.teacher_fraction)
        if not sources:
            if self.corpus is None:
                raise DataError(
                    "no training data: give data.train files or leave it empty for data-free mode"
                )
            return self.corpus.packed(
                "train",
                seq_len=seq_len,
                reply_only=stage == "sft" and d.chat,
                pad_id=pad_token_id(self.tokenizer),
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
            cache_dir=cache_dir_for(self.cfg, "data"),
            progress=is_main_process(),
        )


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cache_dir_for(cfg: RecipeConfig, kind: str) -> Path:
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
        train_topk=_concat_topk([p.train_topk for p in parts]),
    )


def _concat_topk(parts: list):
    """The shards' recorded top-k, concatenated like their rows (None unless every shard recorded one)."""
    from arwkv.ops.divergence import TeacherTopK

    if any(p is None for p in parts) or len({p.ids.shape[1:] for p in parts}) != 1:
        return None
    return TeacherTopK.cat(parts)


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
    # BOS-mode rows of the stage-2 length are one sequence each: keep the top-k the teacher gives while
    # writing them, so stage 2's cache starts filled and the teacher never runs on them again
    dist = cfg.distill
    records = dist.enabled and dist.teacher_topk > 0 and d.data_free.prompts == "bos"
    record_topk = dist.teacher_topk if records and d.data_free.seq_len == dist.seq_len else 0

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
                cache_dir=cache_dir_for(cfg, "teacher_corpus"),
                progress=progress,
                record_topk=record_topk if num_train else 0,
                record_temperature=cfg.distill.kl_temperature,
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
                cache_dir=cache_dir_for(cfg, "data"),
                progress=env.is_main,
            )
            heldout = rows.batch(list(range(min(h.num_sequences, len(rows)))))
    return RunData(cfg, teacher, tokenizer, corpus, heldout, sampling_s=time.perf_counter() - t0)


def open_teacher_cache(
    cfg: RecipeConfig, teacher: nn.Module, tokenizer, rows, rank: int = 0, corpus=None
) -> TeacherCache:
    """The stage-2 teacher cache for these rows, keyed by teacher weights, tokenizer, data, k, T and the
    compute dtype (bf16 autocast gives slightly different log-probs than fp32). Rows of `corpus` (a
    TeacherCorpus) whose top-k was recorded while this teacher sampled them are filled from that record."""
    from arwkv.data.packing import tokenizer_fingerprint
    from arwkv.data.teacher_cache import TeacherCache, fill_from_samples
    from arwkv.data.teacher_corpus import teacher_fingerprint

    key = {
        "teacher": teacher_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
        "data": rows.base_fingerprint,
        "temperature": float(cfg.distill.kl_temperature),
        "compute": "bf16" if cfg.bf16 else str(next(teacher.parameters()).dtype),
    }
    cache = TeacherCache.open(
        cache_dir_for(cfg, "teacher_topk"),
        key,
        num_rows=rows.num_base_rows,
        seq_len=rows.seq_len,
        k=cfg.distill.teacher_topk,
        rank=rank,
    )
    topk = getattr(corpus, "train_topk", None)
    if rank == 0 and topk is not None and _recorded_for(corpus.meta, key, cfg):
        fill_from_samples(cache, rows, corpus.train, topk)
    return cache


def _recorded_for(meta: dict[str, Any], key: dict[str, Any], cfg: RecipeConfig) -> bool:
    """Was the corpus's top-k record made by this teacher, at this k, temperature and compute dtype?"""
    return (
        meta.get("teacher") == key["teacher"]
        and meta.get("record_topk") == cfg.distill.teacher_topk
        and meta.get("record_temperature") == key["temperature"]
        and (meta.get("autocast") == "bfloat16") == (key["compute"] == "bf16")
    )


def heldout_evaluator(cfg: RecipeConfig, teacher: nn.Module, data: RunData, env: DistEnv):
    """`evaluate(model) -> held-out metrics` against the teacher on the run's held-out set (eval mode, no
    gradients, the model's training flag restored). The teacher's held-out hidden states never change: they
    are computed once and kept, when they fit in 2 GB."""
    n_tok, width = int(data.heldout["input_ids"].numel()), int(teacher.config.hidden_size)
    teacher_cache: dict[int, torch.Tensor] | None = {} if n_tok * width * 4 < 2**31 else None

    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return heldout_metrics(
                    model,
                    teacher,
                    iter_batches(data.heldout, cfg.data.heldout.batch_size),
                    confident_p=cfg.eval.confident_p,
                    device=env.device,
                    teacher_cache=teacher_cache,
                )
        finally:
            model.train(was)

    return evaluate
