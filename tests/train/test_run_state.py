"""The run folder's lock: one writer, and a refusal that names the holder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from arwkv.errors import CheckpointError
from arwkv.train.run_state import lock_run_dir


def test_the_lock_names_its_holder_and_is_freed_when_the_holder_dies(tmp_path):
    held = lock_run_dir(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    # another process is refused with the holder named
    probe = (
        "import sys; from pathlib import Path; from arwkv.train.run_state import lock_run_dir\n"
        "try:\n    lock_run_dir(Path(sys.argv[1]))\nexcept Exception as e:\n    print(e); sys.exit(3)"
    )
    other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 3 and f"in use by pid {os.getpid()} on" in other.stdout
    with pytest.raises(CheckpointError, match="two writers would corrupt the run"):
        lock_run_dir(tmp_path)  # a second lock in the same process is refused too (flock per open file)
    held.close()  # as when the holder dies: the kernel drops the lock, nothing stale is left
    again = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout
