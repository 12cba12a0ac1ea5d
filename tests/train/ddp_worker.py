"""Worker for test_distributed.py: the same distillation run under `python` or `torchrun --nproc-per-node N`.

Usage: ddp_worker.py OUT.json RUN_DIR GRAD_ACCUM [ddp|fsdp]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from toys import real_pair, stage_cfg  # noqa: E402

from arwkv.data.packing import PackedCorpus, PackedLoader  # noqa: E402
from arwkv.recipes.distill import DistillTask  # noqa: E402
from arwkv.train.distributed import cleanup, init_distributed  # noqa: E402
from arwkv.train.loop import micro_batch_size, train  # noqa: E402


def corpus(n: int = 24, t: int = 16) -> PackedCorpus:
    """Documents of ragged length kept whole: rows hold several documents plus tail padding, so per-process
    token means would differ from the global mean."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    return PackedCorpus.from_sequences(ids, lengths=lengths.tolist(), whole=True)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    out, run_dir, grad_accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
    strategy = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    env = init_distributed("cpu")
    teacher, student = real_pair(0)
    cfg = stage_cfg(max_steps=4, batch_size=4, grad_accum=grad_accum, ckpt_interval=100, lr=1e-2)
    mb = micro_batch_size(cfg, env.world_size)
    data = PackedLoader(corpus(), mb, rank=env.rank, world_size=env.world_size, seed=0)
    res = train(DistillTask(student, teacher), data, cfg, run_dir, env=env, strategy=strategy)
    state = full_state(student)  # collective under FSDP: every rank takes part
    if env.is_main:
        weights = {k: v.double().sum().item() for k, v in state.items()}
        Path(out).write_text(
            json.dumps(
                {
                    "losses": [r["loss"] for r in res.history],
                    "tokens": res.tokens,
                    "world": env.world_size,
                    "weights": weights,
                }
            )
        )
    cleanup()


if __name__ == "__main__":
    main()
