"""The one training loop every stage uses.

A stage hands in a *task module*: an `nn.Module` whose `forward(batch)` returns `(loss_sum, count, extras)` —
the summed per-token loss of one micro-batch, the number of counted tokens, and a dict of extra sums to log —
and whose optional `count(batch)` gives that number without a forward pass. The loop owns everything else:
AdamW over the given parameter groups, warmup + cosine/constant schedule, gradient accumulation, clipping,
bf16
autocast, DDP/FSDP, token budget, held-out evaluation, progress bar, metrics jsonl (+ TensorBoard), atomic
checkpoints, exact resume, clean stop on Ctrl-C / SIGTERM, and a clear stop on a NaN/inf loss.

The loss of one optimizer step is Σ loss_sum / Σ count over all micro-batches and processes, so a step is the
same
computation however the global batch is split (1 process × 4 micro-steps = 2 processes × 2 = 4 processes × 1).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from arwkv.errors import ArwkvError, ConfigError, TrainingDivergedError
from arwkv.train import checkpoint as ckpt
from arwkv.train.distributed import DistEnv, all_reduce_sum, barrier, current_env, wrap
from arwkv.train.schedule import make_scheduler
from arwkv.train.threads import ThreadTuner

Batch = dict[str, torch.Tensor]


class LoopSettings(Protocol):
    """What the loop reads of a stage's settings. `arwkv.config.StageConfig` (and any object with these
    attributes) fits, so the loop knows nothing of the recipe schema."""

    tokens: int
    max_steps: int
    seq_len: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr: float
    schedule: str
    warmup_steps: int
    clip: float
    weight_decay: float
    betas: list[float] | tuple[float, float]
    eval_interval: int
    ckpt_interval: int
    log_interval: int
    keep_checkpoints: int


class TrainingInterrupted(ArwkvError):
    """Ctrl-C or SIGTERM: the state was checkpointed and training stopped; rerun the same command to
    resume."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class LoopResult:
    steps: int
    tokens: int
    wall_s: float  # training time of this stage across resumes (evaluation and checkpoint writing excluded)
    tokens_per_s: float
    final_loss: float
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  # this session's log records


def total_steps(cfg: LoopSettings) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len)))


def micro_batch_size(cfg: LoopSettings, world_size: int) -> int:
    """Sequences per process per micro-step; the global batch must split evenly."""
    per = cfg.batch_size // (world_size * cfg.grad_accum)
    if per * world_size * cfg.grad_accum != cfg.batch_size or per == 0:
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not split into {world_size} processes x "
            f"{cfg.grad_accum} accumulation steps; make it a multiple of {world_size * cfg.grad_accum}"
        )
    return per


def _default_count(batch: Batch) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


class _StopFlag:
    """First Ctrl-C / SIGTERM asks for a clean stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Logger:
    """metrics.jsonl (+ TensorBoard when installed), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop records past the resumed step so curves stay single-valued
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _to(batch: Batch, device: torch.device) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _set_base_lrs(optimizer: torch.optim.Optimizer, scheduler, bases: list[float]) -> None:
    """After a resume the recipe's LRs win (e.g. a lower LR after a divergence); unchanged LRs give identical
    values."""
    scheduler.base_lrs = list(bases)
    for g, base, fn in zip(optimizer.param_groups, bases, scheduler.lr_lambdas, strict=True):
        g["initial_lr"] = base
        g["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def train(
    task: nn.Module,
    data: Iterator[Batch],
    cfg: LoopSettings,
    run_dir: str | Path,
    *,
    param_groups: list[dict[str, Any]] | None = None,
    env: DistEnv | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    bf16: bool = False,
    strategy: str = "ddp",
    config_yaml: str | None = None,
    resume: bool = True,
    desc: str = "train",
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    thread_tuner: ThreadTuner | None = None,
) -> LoopResult:
    """Train `task` for the stage's token budget.

    `data` yields this process's micro-batches and has `state_dict()` / `load_state_dict()`. `param_groups`:
    AdamW groups ({"params", "lr", "name"}); default all trainable parameters at `cfg.lr`. `eval_fn(task)`
    returns held-out metrics (called on every process, in eval mode, without gradients, with the RNG state
    restored afterwards). `thread_tuner` picks the CPU thread count of each step by measuring (threads.py).
    Returns a LoopResult; raises TrainingInterrupted after a clean stop and
    TrainingDivergedError on a non-finite loss or gradient.
    """
    env = env or current_env()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    n_steps = total_steps(cfg)
    task.to(env.device)
    model = wrap(task, env, strategy)
    if param_groups is None:
        param_groups = [
            {"params": [p for p in task.parameters() if p.requires_grad], "lr": cfg.lr, "name": "all"}
        ]
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups:
        raise ConfigError(f"{desc}: nothing to train (every parameter is frozen)")
    params = [p for g in param_groups for p in g["params"]]
    bases = [g["lr"] for g in param_groups]  # before the scheduler rewrites group["lr"] to the warmup value
    # the fused kernel: one pass over all tensors (on a small CPU student the per-tensor loop of the default
    # implementation was ~7% of a distillation step)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused
    )
    scheduler = make_scheduler(optimizer, n_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr, cfg.schedule)

    step, tokens, wall = 0, 0, 0.0
    if not resume and env.is_main and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir)  # a fresh start: older, higher-numbered checkpoints would shadow the new ones
    barrier()
    last = ckpt.latest_intact_checkpoint(ckpt_dir, warn=env.is_main) if resume else None
    if last is not None:
        state = ckpt.load_checkpoint(last, model, optimizer, scheduler)
        _set_base_lrs(optimizer, scheduler, bases)
        step, tokens, wall = state["step"], state["tokens"], state["wall_s"]
        if state["data"] is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(state["data"])
        if env.is_main:
            print(f"[arwkv] resuming {desc} at step {step} of {n_steps} ({last.name})", file=sys.stderr)
    resumed_at = step if last is not None else None
    count_fn = getattr(task, "count", _default_count)
    logger = _Logger(run_dir, env.is_main, step)
    history: list[dict[str, Any]] = []
    saved_step = step if last is not None else -1
    saved: Path | None = last
    loss_value = float("nan")

    def save(at: int) -> Path:
        nonlocal saved_step, saved
        saved = ckpt.save_checkpoint(
            ckpt_dir,
            at,
            model,
            optimizer,
            scheduler,
            data_state=data.state_dict() if hasattr(data, "state_dict") else None,
            trainer_state={"tokens": tokens, "wall_s": wall, "loss": loss_value, "total_steps": n_steps},
            config_yaml=config_yaml,
            keep=cfg.keep_checkpoints,
        )
        saved_step = at
        return saved

    def evaluate() -> dict[str, float]:
        if eval_fn is None:
            return {}
        rng = ckpt.rng_state()  # evaluation must not shift the training RNG (exact resume)
        task.eval()
        try:
            with torch.no_grad(), _autocast(env, bf16):
                out = eval_fn(task)
        finally:
            task.train()
            ckpt.set_rng_state(rng)
        return out

    autocast = _autocast(env, bf16)
    bar = _progress(n_steps, step, desc, env.is_main)
    t_session, tok_session = time.perf_counter(), 0
    task.train()
    try:
        with _StopFlag() as stop:
            while step < n_steps:
                data_before = data.state_dict() if hasattr(data, "state_dict") else None
                rng_before = ckpt.rng_state()
                threads = thread_tuner.before_step() if thread_tuner is not None else None
                t0 = time.perf_counter()
                micro = [next(data) for _ in range(cfg.grad_accum)]
                counts = torch.tensor(
                    [float(sum(count_fn(b) for b in micro)), float(sum(_default_count(b) for b in micro))],
                    dtype=torch.float64,
                )
                all_reduce_sum(counts)
                denom = max(counts[0].item(), 1.0)
                loss_sum = torch.zeros((), dtype=torch.float64)
                extras_sum: dict[str, torch.Tensor] = {}
                for i, b in enumerate(micro):
                    sync = i == len(micro) - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
                    with contextlib.nullcontext() if sync else model.no_sync():
                        with autocast:
                            out_sum, _, extras = model(_to(b, env.device))
                        (out_sum.float() * (env.world_size / denom)).backward()
                    loss_sum += out_sum.detach().double().cpu()
                    for k, v in extras.items():
                        extras_sum[k] = extras_sum.get(k, 0) + v.detach().double().cpu()
                keys = sorted(extras_sum)
                red = torch.stack(
                    [loss_sum, torch.tensor(float(stop.requested), dtype=torch.float64)]
                    + [extras_sum[k] for k in keys]
                )
                all_reduce_sum(red)
                loss_value = red[0].item() / denom
                grad_norm = _clip(params, cfg.clip)
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    # parameters and optimizer are still those of the last good step: save exactly that state
                    if data_before is not None:
                        data.load_state_dict(data_before)
                    ckpt.set_rng_state(rng_before)
                    optimizer.zero_grad(set_to_none=True)
                    good = saved if saved_step == step else save(step)
                    bad = (
                        f"loss became {loss_value}"
                        if not math.isfinite(loss_value)
                        else f"gradient norm became {grad_norm}"
                    )
                    if step == resumed_at:  # the very first step after a resume: suspect the checkpoint
                        raise TrainingDivergedError(
                            f"{desc}: the {bad} at the first step after resuming from {last}: unless the "
                            "settings changed since it was saved, that checkpoint is damaged. Move it out of "
                            "the checkpoints folder and rerun to resume from the one before it."
                        )
                    raise TrainingDivergedError(
                        f"{desc}: the {bad} at step {step + 1} (lr {optimizer.param_groups[0]['lr']:.3g}). "
                        f"The last good state is saved in {good}. Lower the learning rate ({desc}.lr=...) "
                        "or check the data, then rerun the same command to resume from it."
                    )
                lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                if thread_tuner is not None:
                    thread_tuner.after_step(dt, int(counts[1].item()))
                wall += dt
                tokens += int(counts[1].item())
                tok_session += int(counts[1].item())
                record = {
                    "step": step,
                    "tokens": tokens,
                    "loss": loss_value,
                    **lrs,
                    "grad_norm": grad_norm,
                    "tok_s": counts[1].item() / max(dt, 1e-9),
                    "wall_s": wall,
                }
                record.update({k: red[2 + i].item() / denom for i, k in enumerate(keys)})
                if threads is not None:
                    record["threads"] = threads
                if step % max(cfg.log_interval, 1) == 0 or step == n_steps:
                    logger.log(record)
                history.append(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}", tok_s=f"{tok_session / (time.perf_counter() - t_session):.0f}"
                )
                if on_step is not None:
                    on_step(step, record)
                if (
                    cfg.eval_interval > 0
                    and step % cfg.eval_interval == 0
                    and step < n_steps
                    and eval_fn is not None
                ):
                    logger.log(
                        {
                            "step": step,
                            "tokens": tokens,
                            "wall_s": wall,
                            **{f"eval/{k}": v for k, v in evaluate().items()},
                        }
                    )
                # the reduced flag is what every rank agrees on; a signal that lands after the reduce must
                # wait for the next step, or one rank stops while the other enters the next all_reduce
                stopping = red[1].item() > 0 or (stop.requested and not env.distributed)
                if step % cfg.ckpt_interval == 0 or step == n_steps or stopping:
                    save(step)
                if stopping and step < n_steps:
                    raise TrainingInterrupted(
                        f"{desc}: stopped at step {step}/{n_steps}; state saved in {saved}. "
                        "Run the same command again to resume exactly where it stopped.",
                        saved,
                    )
            if saved_step != step:
                save(step)
    finally:
        bar.close()
        logger.close()
        if thread_tuner is not None:
            thread_tuner.restore()
    return LoopResult(
        steps=step,
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / max(wall, 1e-9),
        final_loss=loss_value,
        checkpoint=saved,
        history=history,
    )


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Global grad norm (all-reduced by DDP/FSDP already), clipped when max_norm > 0."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))


def _autocast(env: DistEnv, bf16: bool):
    return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16, enabled=bf16)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step")
