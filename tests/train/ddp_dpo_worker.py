"""Worker for test_dpo.py: the same DPO run under `python` or `torchrun --nproc-per-node N`.

Usage: ddp_dpo_worker.py OUT.json RUN_DIR GRAD_ACCUM
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from test_dpo import _pairs, _perturbed  # noqa: E402
from toys import real_pair, stage_cfg  # noqa: E402

from arwkv.data.packing import PackedLoader  # noqa: E402
from arwkv.recipes.dpo import DPOTask, frozen_reference  # noqa: E402
from arwkv.train.distributed import cleanup, init_distributed  # noqa: E402
from arwkv.train.loop import micro_batch_size, train  # noqa: E402


def main() -> None:
    out, run_dir, grad_accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
    env = init_distributed("cpu")
    _, student = real_pair(0)
    reference = frozen_reference(student)
    _perturbed(student)  # policy ≠ reference from the first step
    cfg = stage_cfg(max_steps=4, batch_size=4, grad_accum=grad_accum, ckpt_interval=100, lr=1e-2)
    data = PackedLoader(
        _pairs(12), micro_batch_size(cfg, env.world_size), rank=env.rank, world_size=env.world_size, seed=0
    )
    res = train(DPOTask(student, reference, beta=0.5), data, cfg, run_dir, env=env)
    if env.is_main:
        Path(out).write_text(
            json.dumps(
                {
                    "losses": [r["loss"] for r in res.history],
                    "margins": [r["margin"] for r in res.history],
                    "world": env.world_size,
                    "weights": {k: v.double().sum().item() for k, v in student.state_dict().items()},
                }
            )
        )
    cleanup()


if __name__ == "__main__":
    main()
