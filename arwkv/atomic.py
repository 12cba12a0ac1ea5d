"""The one way arwkv writes anything a later run trusts: into a temporary sibling, then renamed into place.

A crash, a kill or a full disk (whatever exception the writer raises) leaves the old file or folder or the new
one, never half of one, and never a stray temporary: the temporary is removed and the exception re-raised
for the caller to turn into its own message.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_file(path: str | Path, write: Callable[[Path], None], *, fsync: bool = False) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


def write_folder(folder: str | Path, build: Callable[[Path], None]) -> bool:
    """`build(tmp)` fills a temporary folder beside `folder`, which is then renamed to `folder`.

    Returns False when another process put a complete `folder` in place first (its copy is kept: callers
    build the same content); raises whatever `build` or the rename raised otherwise."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if folder.is_dir() and any(folder.iterdir()):  # a concurrent builder won the rename
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; removed after a failure
