"""A short distillation killed with SIGKILL at given moments and resumed each time (test_kill_resume.py).

    python kill_driver.py BASE_DIR MOMENT [MOMENT ...]

Trains once uninterrupted in BASE_DIR/full, then in BASE_DIR/killed once per MOMENT, each time in a new
process that resumes the same run folder and kills itself at that moment, then once more to the end. The
processes are forked from this one after the imports, so the scenario costs one interpreter start.

A MOMENT is `none` (run to the end), `step:N` (after optimizer step N), `write:N` (before the N-th checkpoint
file this process writes), `write-half:N` (the N-th file written, then cut to half its size: a kill in the
middle of writing it), `publish:N` (every file of the N-th checkpoint written, before its folder is renamed
into place) or `published:N` (just after the N-th rename, before the older checkpoints are pruned); counts
are per process. A finished run saves the student's weights to RUN_DIR/final.safetensors. Prints one JSON
line: how each process ended (`killed` or `exit 0`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from safetensors.torch import save_file  # noqa: E402
from toys import real_pair, stage_cfg  # noqa: E402

from arwkv.data.packing import PackedCorpus, PackedLoader  # noqa: E402
from arwkv.recipes.distill import DistillTask  # noqa: E402
from arwkv.train import checkpoint as ckpt  # noqa: E402
from arwkv.train.loop import train  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(moment: str) -> int | None:
    """Patch the checkpoint writer to die at `moment`; the step to die after, when that is the moment."""
    kind, _, n = moment.partition(":")
    n = int(n or 0)
    calls = {"write": 0, "replace": 0}
    write, replace = ckpt._write, os.replace

    def counted_write(path, writer):
        calls["write"] += 1
        if calls["write"] == n and kind == "write":
            _die()
        write(path, writer)
        if calls["write"] == n and kind == "write-half":
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            _die()

    def counted_replace(src, dst):
        is_checkpoint = Path(dst).name.startswith(ckpt.PREFIX)
        calls["replace"] += is_checkpoint
        if is_checkpoint and calls["replace"] == n and kind == "publish":
            _die()
        replace(src, dst)
        if is_checkpoint and calls["replace"] == n and kind == "published":
            _die()

    ckpt._write = counted_write
    ckpt.os.replace = counted_replace
    return n if kind == "step" else None


def main(run_dir: str, moment: str) -> None:
    torch.set_num_threads(1)
    die_after = _arm(moment)
    teacher, student = real_pair(0)
    corpus = torch.randint(
        3, teacher.config.vocab_size, (24, 16), generator=torch.Generator().manual_seed(123)
    )
    cfg = stage_cfg(max_steps=8, ckpt_interval=2, keep_checkpoints=1)
    data = PackedLoader(PackedCorpus.from_sequences(corpus), cfg.batch_size, seed=0)
    torch.manual_seed(7)  # a resumed run takes its RNG state from the checkpoint instead

    def on_step(step: int, record: dict) -> None:
        if step == die_after:
            _die()

    train(DistillTask(student, teacher), data, cfg, run_dir, on_step=on_step)
    save_file(
        {k: v.contiguous() for k, v in student.state_dict().items()}, str(Path(run_dir) / "final.safetensors")
    )


def _in_child(run_dir: Path, moment: str) -> str:
    """Run `main` in a forked process; how it ended."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        try:
            main(str(run_dir), moment)
            os._exit(0)
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


if __name__ == "__main__":
    base, moments = Path(sys.argv[1]), sys.argv[2:]
    ended = {"full": _in_child(base / "full", "none")}
    for i, moment in enumerate(moments):
        ended[f"{i}:{moment}"] = _in_child(base / "killed", moment)
    ended["resumed"] = _in_child(base / "killed", "none")
    print(json.dumps(ended))
