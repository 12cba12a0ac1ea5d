"""A run folder's bookkeeping, apart from what the recipe means: one writer at a time (`.lock`), the results
recorded so far (`summary.json`, rewritten atomically after every phase so a rerun continues where the last
one stopped), and which stages already ran to their end. Plain dicts only: `train` reads no recipe schema."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from arwkv.atomic import write_json
from arwkv.errors import CheckpointError

SUMMARY_FILE = "summary.json"


def lock_run_dir(run_dir: Path) -> IO[str]:
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
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def load_summary(run_dir: Path, resume: bool, config: dict[str, Any]) -> dict[str, Any]:
    """What an earlier run in `run_dir` recorded (nothing unless `resume`), with a `stages` table, and its
    `config` (or `config` when there was none)."""
    path = run_dir / SUMMARY_FILE
    summary: dict[str, Any] = json.loads(path.read_text()) if resume and path.is_file() else {}
    summary.setdefault("stages", {})
    summary.setdefault("config", config)
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json(run_dir / SUMMARY_FILE, summary)


def finished_stage(
    summary: dict[str, Any], name: str, config: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any] | None:
    """The record of stage `name` when it already ran to its end (the run skips it and restores its
    checkpoint), else None. A finished stage is kept as it is: `say` names the keys of its `config` that
    changed since it ran."""
    done = summary["stages"].get(name)
    if not (done and done.get("done")):
        return None
    say(f"{name}: already done, restoring its final state")
    changed = [k for k, v in config.items() if done.get("config", {}).get(k, v) != v]
    if changed:
        say(
            f"{name}: note: {', '.join(changed)} changed since it ran; the finished stage is "
            "kept (use another out_dir, or --fresh, to train it again)"
        )
    return done
