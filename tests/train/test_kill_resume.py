"""`kill -9` at eight moments of training and checkpoint writing: each time the run resumes from the newest
intact checkpoint, and the run finishes bit-identical to one that was never interrupted.

The moments (one process each, resuming the same run folder; the loop checkpoints every 2 of 8 steps and keeps
one): after a training step; before the model file of a checkpoint; in the middle of the model file; before
its state file; with every file written but the folder not yet renamed into place; just after the rename,
before the older checkpoint is pruned; in the middle of the next checkpoint's state file; after the last
checkpoint is published. `kill_driver.py` runs them (forked after one interpreter start).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

MOMENTS = [
    "step:3",
    "write:2",
    "write-half:2",
    "write:4",
    "publish:1",
    "published:1",
    "write-half:4",
    "published:2",
]


def test_killed_at_eight_moments_resumes_bit_identical(tmp_path: Path) -> None:
    driver = Path(__file__).with_name("kill_driver.py")
    done = subprocess.run(
        [sys.executable, str(driver), str(tmp_path), *MOMENTS], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ended = json.loads(done.stdout.strip().splitlines()[-1])
    assert ended.pop("full") == "exit 0" and ended.pop("resumed") == "exit 0", done.stderr[-3000:]
    assert list(ended.values()) == ["killed"] * len(MOMENTS), ended  # every moment was reached

    full, killed = (
        load_file(tmp_path / "full" / "final.safetensors"),
        load_file(tmp_path / "killed" / "final.safetensors"),
    )
    assert full.keys() == killed.keys()
    for name in full:
        assert torch.equal(full[name], killed[name]), name

    def steps(run: str) -> list[int]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["step"] for r in map(json.loads, lines) if "loss" in r]

    assert steps("killed") == steps("full") == list(range(1, 9))  # each step logged once, none lost
    left = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert not [n for n in left if n.startswith(".tmp")] and left[-1] == "step_000008", left
