"""The teacher's top-k next-token distribution, kept on disk so the teacher runs once per training row, ever.

Stage 2 needs the teacher's distribution at every position of every row it trains on. Recomputing it costs
a full teacher forward per step; reading it from this cache costs a few hundred bytes per token. For each
row of a packed corpus the cache holds, at every position, the top-k token ids (int32), their log-probs
(fp16) and the log of the remaining mass (fp32), as memory-mapped `.npy` arrays in one folder:

    <cache_dir>/topk-<key>/meta.json        what it was made from (teacher, tokenizer, data, k, T, dtype)
    <cache_dir>/topk-<key>/ids.npy          [N, T, k] int32
    <cache_dir>/topk-<key>/logp.npy         [N, T, k] float16
    <cache_dir>/topk-<key>/tail.npy         [N, T] float32
    <cache_dir>/topk-<key>/done-<rank>.npy  [N] uint64: crc32 of each row this process wrote, | 1 << 32

Rows are filled lazily: the first time a row is trained on, the teacher runs on it and its entry is
written; later epochs, resumed runs and other runs with the same key read it (rows the teacher itself wrote
in BOS mode come pre-filled from the top-k it gave while sampling them, `fill_from_samples`). A row counts
as present only once its bytes are flushed and its checksum is recorded (the record is replaced
atomically), so a run killed mid-write recomputes that row; a row whose bytes no longer match its checksum
(a corrupt file) is recomputed too. Space for the whole cache is reserved when it is created, so a full
disk is a clear error at the start, never a crash in the middle of training. `meta.json` is checked against
the run's own key on every open: a cache written for another teacher, tokenizer, data, k, temperature or
dtype is refused, the difference named.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from arwkv.atomic import write_file, write_folder
from arwkv.errors import DataError
from arwkv.ops.divergence import TeacherTopK

FORMAT_VERSION = 1
_PRESENT = np.uint64(1 << 32)


def bytes_per_token(k: int) -> int:
    """Cache size per token: k ids (int32) + k log-probs (fp16) + the tail (fp32)."""
    return 6 * k + 4


class TeacherCache:
    """Memory-mapped top-k teacher outputs for the rows of one packed corpus (see the module docstring).

    >>> cache = TeacherCache.open(folder, key_meta, num_rows=len(corpus.tokens), seq_len=256, k=64)
    >>> missing = cache.missing(rows)            # rows the teacher still has to see
    >>> cache.store(missing, ids, logp, tail)    # [m, T, k], [m, T, k], [m, T]
    >>> ids, logp, tail = cache.fetch(rows)
    """

    def __init__(self, folder: Path, meta: dict[str, Any], rank: int = 0) -> None:
        self.folder, self.meta, self.rank = folder, meta, rank
        n, t, k = meta["num_rows"], meta["seq_len"], meta["k"]
        for name, shape in (("ids", (n, t, k)), ("logp", (n, t, k)), ("tail", (n, t))):
            _check_npy(folder / f"{name}.npy", shape)
        try:
            self.ids = np.load(folder / "ids.npy", mmap_mode="r+")
            self.logp = np.load(folder / "logp.npy", mmap_mode="r+")
            self.tail = np.load(folder / "tail.npy", mmap_mode="r+")
        except (OSError, ValueError) as e:
            raise DataError(
                f"the teacher cache {folder} is unreadable ({e}); delete the folder to rebuild"
            ) from e
        for name, arr, shape in (
            ("ids", self.ids, (n, t, k)),
            ("logp", self.logp, (n, t, k)),
            ("tail", self.tail, (n, t)),
        ):
            if arr.shape != shape:
                raise DataError(
                    f"the teacher cache {folder}: {name}.npy has shape {arr.shape}, expected {shape} "
                    "(truncated or written by something else); delete the folder to rebuild"
                )
        self.crc = np.zeros(n, np.uint64)  # this process's own records
        own = folder / f"done-{rank}.npy"
        if own.is_file():
            self.crc = self._read_done(own)
        self.rebuilt = 0  # rows found corrupt and recomputed

    # ------------------------------------------------------------------------------------------ creation

    @classmethod
    def open(
        cls,
        cache_dir: str | Path,
        key_meta: dict[str, Any],
        *,
        num_rows: int,
        seq_len: int,
        k: int,
        rank: int = 0,
    ) -> TeacherCache:
        """The cache for `key_meta` (teacher, tokenizer, data fingerprints, temperature, dtype), created if
        absent. A folder with the same name but other contents is refused, naming what differs."""
        meta = {
            "format": FORMAT_VERSION,
            **key_meta,
            "k": int(k),
            "num_rows": int(num_rows),
            "seq_len": int(seq_len),
        }
        key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
        folder = Path(cache_dir) / f"topk-{key[:20]}"
        if not (folder / "meta.json").is_file():
            _create(folder, meta)
        try:
            found = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"the teacher cache {folder} has no readable meta.json ({e}); delete it") from e
        diff = [name for name in sorted(set(meta) | set(found)) if meta.get(name) != found.get(name)]
        if diff:
            raise DataError(
                f"the teacher cache {folder} was written for another {', '.join(diff)} "
                f"({', '.join(f'{d}: {found.get(d)!r} there, {meta.get(d)!r} here' for d in diff[:3])}); "
                "it is not reused — delete it or set another cache folder"
            )
        return cls(folder, meta, rank)

    # ------------------------------------------------------------------------------------------ reading

    def _read_done(self, path: Path) -> np.ndarray:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return np.zeros(self.meta["num_rows"], np.uint64)  # unreadable record: those rows are recomputed
        if arr.shape != (self.meta["num_rows"],) or arr.dtype != np.uint64:
            return np.zeros(self.meta["num_rows"], np.uint64)
        return arr

    def _records(self) -> np.ndarray:
        """Checksums of present rows from every process's record (other ranks fill other rows)."""
        out = self.crc.copy()
        for path in self.folder.glob("done-*.npy"):
            if path.name != f"done-{self.rank}.npy":
                other = self._read_done(path)
                out = np.where(out == 0, other, out)
        return out

    def _row_crc(self, row: int) -> np.uint64:
        c = zlib.crc32(self.ids[row].tobytes())
        c = zlib.crc32(self.logp[row].tobytes(), c)
        c = zlib.crc32(self.tail[row].tobytes(), c)
        return np.uint64(c) | _PRESENT

    def missing(self, rows: np.ndarray | Tensor) -> np.ndarray:
        """The subset of `rows` (absolute row indices) whose entry is absent or fails its checksum."""
        rows = np.asarray(rows, dtype=np.int64)
        rec = self._records()
        bad = []
        for r in rows:
            if rec[r] == 0:
                bad.append(r)
            elif self._row_crc(int(r)) != rec[r]:
                bad.append(r)
                self.rebuilt += 1
        return np.asarray(sorted(set(bad)), dtype=np.int64)

    def fetch(self, rows: np.ndarray | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [B, T, k] int64, logp [B, T, k] fp32, tail [B, T] fp32) for `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        return (
            torch.from_numpy(self.ids[rows].astype(np.int64)),
            torch.from_numpy(self.logp[rows].astype(np.float32)),
            torch.from_numpy(np.array(self.tail[rows], dtype=np.float32)),
        )

    def filled(self) -> int:
        return int((self._records() != 0).sum())

    # ------------------------------------------------------------------------------------------ writing

    def store(self, rows: np.ndarray, ids: Tensor, logp: Tensor, tail: Tensor) -> None:
        """Write the entries of `rows`, flush them, then record their checksums (atomically)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        try:
            self.ids[rows] = ids.to(torch.int32).cpu().numpy()
            self.logp[rows] = logp.to(torch.float16).cpu().numpy()
            self.tail[rows] = tail.float().cpu().numpy()
            for arr in (self.ids, self.logp, self.tail):
                arr.flush()
            for r in rows:
                self.crc[r] = self._row_crc(int(r))
            _save_npy_atomically(self.folder / f"done-{self.rank}.npy", self.crc)
        except Exception as e:  # rows not recorded in done-<rank>.npy are recomputed by the next run
            raise DataError(
                f"could not write the teacher cache {self.folder}: {type(e).__name__}: {e}"
            ) from e


def _create(folder: Path, meta: dict[str, Any]) -> None:
    """Create the arrays in a temporary sibling with their space reserved, then rename it into place."""
    n, t, k = meta["num_rows"], meta["seq_len"], meta["k"]

    def build(tmp: Path) -> None:
        for name, dtype, shape in (
            ("ids", np.int32, (n, t, k)),
            ("logp", np.float16, (n, t, k)),
            ("tail", np.float32, (n, t)),
        ):
            arr = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            offset, size = arr.offset, arr.nbytes
            del arr
            # reserve the blocks now: a sparse file would fail later, inside training, as a SIGBUS
            with open(tmp / f"{name}.npy", "r+b") as f:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), offset, max(size, 1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))

    try:
        write_folder(folder, build)
    except OSError as e:
        if (folder / "meta.json").is_file():
            return  # another process created it first
        need = bytes_per_token(k) * n * t
        raise DataError(
            f"could not create the teacher cache {folder} ({need / 1e6:.0f} MB): {e}; free disk space, "
            "set data cache elsewhere (out_dir) or lower distill.teacher_topk"
        ) from e


def _check_npy(path: Path, shape: tuple[int, ...]) -> None:
    """Refuse a missing, truncated or reshaped array before mapping it (numpy would silently zero-extend a
    short file opened for writing)."""
    problem = ""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            found, _, dtype = read(f)
            header = f.tell()
        size = path.stat().st_size
        if tuple(found) != shape:
            problem = f"shape {tuple(found)}, expected {shape}"
        elif size != header + int(np.prod(shape)) * dtype.itemsize:
            problem = f"{size} bytes, expected {header + int(np.prod(shape)) * dtype.itemsize} (truncated?)"
    except (OSError, ValueError) as e:
        problem = str(e)
    if problem:
        raise DataError(
            f"the teacher cache file {path} is damaged ({problem}); delete {path.parent} to rebuild it"
        )


def _save_npy_atomically(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    write_file(path, write, fsync=True)


def fill_from_samples(
    cache: TeacherCache, rows, sequences: Tensor, topk: TeacherTopK, chunk: int = 64
) -> int:
    """Write the entries of the rows of `rows` (a PackedCorpus or MixedCorpus) that hold exactly one of
    `sequences` [N, T] (one document filling the row): their teacher top-k was recorded while the teacher
    sampled them (`topk`, [N, T, k]), so the teacher need not run on them again. Rows already present and
    rows of other text are left alone. Returns how many rows were written."""
    t, k = cache.meta["seq_len"], cache.meta["k"]
    if sequences.shape[1] != t or topk.ids.shape[-1] != k:
        return 0
    index = {sequences[i].numpy().tobytes(): i for i in range(len(sequences))}
    ramp = torch.arange(t)
    written = 0
    for start in range(0, len(rows), chunk):
        idx = np.arange(start, min(start + chunk, len(rows)))
        absolute = rows.absolute_rows(idx)
        batch = rows.batch(idx)
        tokens, pos = batch["input_ids"], batch.get("position_ids")
        mask = batch.get("attention_mask")
        found: dict[int, int] = {}
        for j in range(len(idx)):
            whole = (pos is None or bool((pos[j] == ramp).all())) and (mask is None or bool(mask[j].all()))
            i = index.get(tokens[j].numpy().tobytes()) if whole else None
            if i is not None:
                found[int(absolute[j])] = i
        todo = [r for r in cache.missing(np.asarray(sorted(found), dtype=np.int64)) if int(r) in found]
        if todo:
            sel = torch.tensor([found[int(r)] for r in todo])
            cache.store(np.asarray(todo), topk.ids[sel], topk.logp[sel], topk.tail_logp[sel])
            written += len(todo)
    return written
