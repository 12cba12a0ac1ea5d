"""Process-group setup that works unchanged under `python`, `torchrun` and `accelerate launch`.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; when WORLD_SIZE > 1 we
join the group (nccl on CUDA, gloo on CPU) and wrap the trainable module in DDP, or shard it with FSDP2
(`fully_shard` per decoder layer, then the root) when `strategy="fsdp"` for students that do not fit one
device. Only rank 0 logs,
shows progress bars and writes shared files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def say(env: DistEnv, msg: str) -> None:
    """An `[arwkv] …` progress line, printed by the main process only (every DDP process runs the recipe)."""
    if env.is_main:
        print(f"[arwkv] {msg}", flush=True)


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Join the process group when launched with WORLD_SIZE > 1; otherwise a single-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def current_env() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", "0")),
            resolve_device("auto", int(os.environ.get("LOCAL_RANK", "0"))),
        )
    return DistEnv()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place, also returned); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(module: nn.Module, env: DistEnv, strategy: str = "ddp") -> nn.Module:
    """DDP (or FSDP2) around the module that holds the trainable parameters; identity in one process."""
    if not env.distributed:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for sub in module.modules():  # shard per decoder layer so only one layer is gathered at a time
            if type(sub).__name__.endswith("DecoderLayer") and not isinstance(sub, FSDPModule):
                fully_shard(sub)
        return module if isinstance(module, FSDPModule) else fully_shard(module)
    if strategy != "ddp":
        raise ValueError(f"unknown distributed strategy {strategy!r} (ddp or fsdp)")
    ids = [env.device.index] if env.device.type == "cuda" else None
    # find_unused_parameters: some trainable tensors get no gradient (the first RWKV layer's value-residual
    # gate has no v_first to mix in)
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, static_graph=True)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
