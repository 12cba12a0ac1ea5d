"""`processes=2` stops like one process: SIGTERM to the command saves, says so once and exits 130; a
launcher killed with SIGKILL takes its DDP workers with it (they stop and release the run folder), so no
training goes on behind a dead command."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.recipes.test_convert import TINY, _teacher

REPO = Path(__file__).resolve().parents[2]


def _start(shared, run: Path) -> subprocess.Popen:
    over = [o for o in TINY if not o.startswith(("processes", "distill.max_steps", "distill.ckpt_interval"))]
    cmd = [sys.executable, "-m", "arwkv", "convert", "--recipe", "stories260k", _teacher(shared), *over]
    cmd += [f"out_dir={run}", "processes=2", "distill.max_steps=100000", "distill.ckpt_interval=50"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_distill(run: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    metrics = run / "distill" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("distillation did not start in time")
        time.sleep(0.5)


def _lock_is_free(run: Path) -> bool:
    with open(run / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


@pytest.mark.slow
def test_sigterm_with_two_processes_stops_once_with_exit_130(shared, tmp_path):
    run = tmp_path / "r"
    proc = _start(shared, run)
    _wait_for_distill(run, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.count("stopped at step") == 1, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    ckpts = sorted((run / "distill" / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "rank1.pt").is_file()  # both processes saved their part


@pytest.mark.slow
def test_workers_die_with_a_killed_launcher(shared, tmp_path):
    run = tmp_path / "r"
    proc = _start(shared, run)
    _wait_for_distill(run, proc)
    assert not _lock_is_free(run)  # rank 0 holds the run folder
    proc.kill()  # SIGKILL: the launcher cannot forward anything
    proc.communicate()
    t0 = time.time()
    while not _lock_is_free(run):
        assert time.time() - t0 < 120, "DDP workers kept running after their launcher was killed"
        time.sleep(0.5)
