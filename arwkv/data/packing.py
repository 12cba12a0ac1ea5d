"""Tokenize documents, pack them into fixed-length rows with document boundaries, and stream the rows.

Batches are dicts of `[B, T]` int64 tensors (design.md): `input_ids`, `position_ids`, `attention_mask`
(1 = real token), `loss_mask` (1 = the token is a prediction target).

Packing rules (a *segment* is a stretch of a row that the model sees as one document):

* Every document starts a new segment: `position_ids` restart at 0 there, so transformers' packed-sequence
  rule (a step other than +1 starts a document) and the student's state reset fire at the same place.
  Documents are never joined without that reset.
* Text documents flow into rows: a document that does not fit in the rest of a row is cut at the row end and
  continues at the start of the next row as a new segment (position 0 again). Rows are therefore full, and a
  document longer than T becomes T-sized pieces, each treated as a document of its own.
* Documents that must stay whole (chat conversations) start a fresh row when they do not fit in the rest of
  the current one (the rest is padding); a conversation longer than T is cut into T-token pieces, each
  starting a fresh row.
* The first token of every segment has loss_mask 0: nothing in its segment predicts it.
* Padding (only the tail of a row) has attention_mask 0, loss_mask 0 and is a segment of its own.

Labels are shifted once, in the loss: logits[:, t] predict input_ids[:, t+1], weighted by loss_mask[:, t+1].

Rows live in two arrays (in memory or memory-mapped from a cache folder): token ids (int32) and flags (uint8:
bit 0 attention, bit 1 loss, bit 2 segment start); positions are rebuilt per batch from the start bits.

`PackedLoader` streams micro-batches of rows: a seeded permutation per epoch, concatenated epoch after epoch;
micro-batch k of the run takes global rows [k*B*W, (k+1)*B*W) of that stream and rank r every W-th of them
(so 1 process with gradient accumulation sees the same global batches as W processes). Its `state_dict()` is
the exact stream position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from arwkv.atomic import write_folder
from arwkv.data.chat import Method, render_chat
from arwkv.data.sources import Document, TextSplit, iter_documents, resolve_sources, sources_fingerprint
from arwkv.errors import DataError
from arwkv.loading import pad_token_id

ATTN, LOSS, START = 1, 2, 4
FORMAT_VERSION = 1


@dataclass
class TokenDoc:
    """Token ids of one document; `loss_mask` None means every token (but the first) is a target."""

    ids: np.ndarray
    loss_mask: np.ndarray | None = None
    whole: bool = False  # keep in one row when it fits (chat conversations)


# ---------------------------------------------------------------------------------------------- tokenizing


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the vocabulary, merges, normalization, special tokens or chat template change."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    h.update(json.dumps([str(getattr(tokenizer, "chat_template", "")), tokenizer.all_special_ids]).encode())
    return h.hexdigest()


def teacher_vocab_size(teacher) -> int:
    """Rows of the teacher's input embedding (config.vocab_size when given a config)."""
    if hasattr(teacher, "get_input_embeddings") and teacher.get_input_embeddings() is not None:
        return int(teacher.get_input_embeddings().num_embeddings)
    return int(getattr(teacher, "config", teacher).vocab_size)


def check_tokenizer_vocab(tokenizer, teacher) -> None:
    """Raise `DataError` when the tokenizer cannot be the teacher's.

    Embedding tables are often padded past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens), so a
    larger table is fine; a smaller one would index past it, and a much larger one means another vocabulary.
    """
    n, vocab = len(tokenizer), teacher_vocab_size(teacher)
    slack = max(1024, vocab // 64)
    if n > vocab or vocab - n > slack:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        tname = getattr(getattr(teacher, "config", teacher), "_name_or_path", "") or "the teacher"
        why = (
            f"ids up to {n - 1} would index past its embedding"
            if n > vocab
            else f"{vocab - n} embedding rows would never be used"
        )
        raise DataError(
            f"tokenizer {name!r} ({n} tokens) does not match teacher {tname!r} (vocabulary {vocab}): {why}. "
            "Use the tokenizer saved with the teacher (teacher.tokenizer in the recipe must name the same "
            "model's tokenizer)"
        )


def tokenize_documents(
    docs: Iterable[Document],
    tokenizer,
    *,
    add_eos: bool = False,
    chat_method: Method = "auto",
    template_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> Iterator[TokenDoc]:
    """Token ids of each document, in order. Text uses the tokenizer's own special-token convention (Llama
    adds BOS, Qwen and SmolLM2 add nothing), plus EOS when `add_eos`; chat documents are rendered with the
    chat template and carry the assistant-token mask."""
    batch: list[str] = []

    def flush() -> Iterator[TokenDoc]:
        if batch:
            for ids in tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]:
                if add_eos and tokenizer.eos_token_id is not None:
                    ids = [*ids, tokenizer.eos_token_id]
                yield TokenDoc(np.asarray(ids, dtype=np.int64))
            batch.clear()

    for doc in docs:
        if doc.messages is None:
            batch.append(doc.text)
            if len(batch) >= batch_size:
                yield from flush()
            continue
        yield from flush()
        try:
            ids, mask = render_chat(tokenizer, doc.messages, method=chat_method, **(template_kwargs or {}))
        except DataError as e:
            raise DataError(f"{doc.origin}: {e}") from e
        yield TokenDoc(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8), whole=True)
    yield from flush()


# ------------------------------------------------------------------------------------------------ packing


class _RowSink:
    """Collects packed rows in memory, or appends them to raw files in `folder` (memory-mapped later)."""

    def __init__(self, seq_len: int, folder: Path | None):
        self.seq_len, self.folder, self.n = seq_len, folder, 0
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []
        if folder is not None:
            self.files = (open(folder / "tokens.bin", "wb"), open(folder / "flags.bin", "wb"))  # noqa: SIM115

    def append(self, tokens: np.ndarray, flags: np.ndarray) -> None:
        self.n += 1
        if self.folder is None:
            self.chunks.append((tokens.copy(), flags.copy()))
        else:
            self.files[0].write(tokens.astype("<i4").tobytes())
            self.files[1].write(flags.tobytes())

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        if self.folder is None:
            if not self.chunks:
                return np.zeros((0, self.seq_len), np.int32), np.zeros((0, self.seq_len), np.uint8)
            return np.stack([c[0] for c in self.chunks]), np.stack([c[1] for c in self.chunks])
        for f in self.files:
            f.close()
        return _open_arrays(self.folder, self.n, self.seq_len)


def _open_arrays(folder: Path, n: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    if n == 0:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.uint8)
    return (
        np.memmap(folder / "tokens.bin", dtype="<i4", mode="r", shape=(n, seq_len)),
        np.memmap(folder / "flags.bin", dtype=np.uint8, mode="r", shape=(n, seq_len)),
    )


class _Packer:
    def __init__(self, seq_len: int, pad_id: int, sink: _RowSink):
        self.T, self.pad_id, self.sink = seq_len, pad_id, sink
        self.tokens = np.full(seq_len, pad_id, np.int32)
        self.flags = np.zeros(seq_len, np.uint8)
        self.fill = 0

    def add(self, doc: TokenDoc) -> None:
        n = len(doc.ids)
        if n == 0:
            return
        mask = np.ones(n, np.uint8) if doc.loss_mask is None else doc.loss_mask.astype(np.uint8)
        if len(mask) != n:
            raise DataError(f"loss mask has {len(mask)} entries for {n} tokens")
        if doc.whole and self.fill and n > self.T - self.fill:
            self.emit()  # keep the conversation together (or start its pieces at a row start)
        pos = 0
        while pos < n:
            if self.fill == self.T:
                self.emit()
            take = min(self.T - self.fill, n - pos)
            seg = slice(self.fill, self.fill + take)
            self.tokens[seg] = doc.ids[pos : pos + take]
            self.flags[seg] = ATTN | (mask[pos : pos + take] * LOSS)
            self.flags[self.fill] = ATTN | START  # a segment's first token is never a target
            self.fill += take
            pos += take

    def emit(self) -> None:
        if self.fill == 0:
            return
        if self.fill < self.T:  # padding tail: its own segment, not attended, not a target
            self.tokens[self.fill :] = self.pad_id
            self.flags[self.fill :] = 0
            self.flags[self.fill] = START
        self.sink.append(self.tokens, self.flags)
        self.fill = 0


def pack_documents(
    docs: Iterable[TokenDoc],
    seq_len: int,
    *,
    pad_id: int = 0,
    folder: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = False,
) -> PackedCorpus:
    """Pack token documents into rows of `seq_len` (module docstring); `folder` keeps them on disk."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {seq_len}")
    sink = _RowSink(seq_len, Path(folder) if folder is not None else None)
    packer = _Packer(seq_len, pad_id, sink)
    n_docs = n_tokens = 0
    bar = tqdm(desc="packing", unit=" tok", unit_scale=True, disable=not progress)
    for doc in docs:
        packer.add(doc)
        n_docs += 1
        n_tokens += len(doc.ids)
        bar.update(len(doc.ids))
    packer.emit()
    bar.close()
    tokens, flags = sink.close()
    meta = {
        "format": FORMAT_VERSION,
        "seq_len": seq_len,
        "num_rows": sink.n,
        "num_documents": n_docs,
        "num_tokens": n_tokens,
        "pad_id": pad_id,
        "fingerprint": fingerprint or _array_hash(tokens, flags),
    }
    if folder is not None:
        (Path(folder) / "meta.json").write_text(json.dumps(meta, indent=1))
    return PackedCorpus(tokens, flags, meta)


def _array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ corpus


class PackedCorpus:
    """Packed rows `[N, T]` (optionally a subset view `rows`); `batch(idx)` builds training tensors."""

    def __init__(
        self, tokens: np.ndarray, flags: np.ndarray, meta: dict[str, Any], rows: np.ndarray | None = None
    ):
        self.tokens, self.flags, self.meta, self.rows = tokens, flags, meta, rows

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def fingerprint(self) -> str:
        if self.rows is None:
            return self.meta["fingerprint"]
        return hashlib.sha256((self.meta["fingerprint"] + _array_hash(self.rows)).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else int(self.meta["num_rows"])

    def batch(self, idx: np.ndarray | list[int]) -> dict[str, Tensor]:
        """Rows `idx` (indices into this corpus) as the batch dict of `[B, T]` int64 tensors."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.rows is not None:
            idx = self.rows[idx]
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to a memory-mapped file
        tokens = np.empty((len(idx), self.seq_len), np.int64)
        flags = np.empty((len(idx), self.seq_len), np.uint8)
        tokens[order], flags[order] = self.tokens[idx[order]], self.flags[idx[order]]
        return batch_from_flags(tokens, flags)

    def absolute_rows(self, idx: np.ndarray | list[int]) -> np.ndarray:
        """Row numbers in the underlying arrays (stable across subset views: what a teacher cache keys on)."""
        idx = np.asarray(idx, dtype=np.int64)
        return self.rows[idx] if self.rows is not None else idx

    @property
    def num_base_rows(self) -> int:
        return int(self.meta["num_rows"])

    @property
    def base_fingerprint(self) -> str:
        """What the underlying rows hold (a hash of their tokens and flags, not of file names or dates):
        a teacher cache keyed on it survives a re-pack of the same text, e.g. after the files were copied."""
        if not hasattr(self, "_content_hash"):
            self._content_hash = _array_hash(np.asarray(self.tokens), np.asarray(self.flags))
        return self._content_hash

    def tensors(self) -> dict[str, Tensor]:
        """Every row at once (small corpora, held-out sets)."""
        return self.batch(np.arange(len(self)))

    def split(self, heldout_rows: int, seed: int = 0) -> tuple[PackedCorpus, PackedCorpus]:
        """(train, held-out): `heldout_rows` rows chosen by a seeded draw, disjoint from the rest.

        Rows are disjoint; a document cut across two rows may have pieces on both sides.
        """
        n = len(self)
        if not 0 < heldout_rows < n:
            raise DataError(f"cannot hold out {heldout_rows} of {n} packed rows; need 0 < heldout < {n}")
        base = self.rows if self.rows is not None else np.arange(n)
        pick = np.random.Generator(np.random.PCG64([seed, 7])).permutation(n)
        held = np.sort(base[pick[:heldout_rows]])
        train = np.sort(base[pick[heldout_rows:]])
        return (
            PackedCorpus(self.tokens, self.flags, self.meta, train),
            PackedCorpus(self.tokens, self.flags, self.meta, held),
        )

    @classmethod
    def load(cls, folder: str | Path) -> PackedCorpus:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{folder} is not a packed-corpus folder (meta.json unreadable: {e})") from e
        if meta.get("format") != FORMAT_VERSION:
            raise DataError(f"{folder} was packed by another arwkv version; delete it to rebuild")
        return cls(*_open_arrays(folder, meta["num_rows"], meta["seq_len"]), meta)

    @classmethod
    def from_sequences(
        cls,
        ids: Tensor | np.ndarray,
        seq_len: int | None = None,
        *,
        lengths: Iterable[int] | None = None,
        loss_mask: Tensor | np.ndarray | None = None,
        whole: bool = False,
        pad_id: int = 0,
    ) -> PackedCorpus:
        """Each row of `ids` [N, L] (first `lengths[i]` tokens when given) is one document; packed to
        `seq_len` (default L), so with seq_len == L every sequence is exactly one row."""
        ids = np.asarray(ids)
        mask = None if loss_mask is None else np.asarray(loss_mask).astype(np.uint8)
        lens = [ids.shape[1]] * len(ids) if lengths is None else [int(n) for n in lengths]
        docs = (
            TokenDoc(ids[i, :n], None if mask is None else mask[i, :n], whole) for i, n in enumerate(lens)
        )
        fp = _array_hash(ids, np.asarray(lens), *([] if mask is None else [mask]))
        return pack_documents(docs, seq_len or ids.shape[1], pad_id=pad_id, fingerprint=fp)


class MixedCorpus:
    """Two packed corpora (same `seq_len`) drawn in a stated proportion: `fraction` of the rows come from
    `first`, the rest from `second`; the smaller side repeats so the proportion holds over every epoch.

    >>> mix = MixedCorpus(teacher_rows, file_rows, fraction=0.5)   # half teacher-written, half real text
    """

    def __init__(self, first: PackedCorpus, second: PackedCorpus, fraction: float) -> None:
        if first.seq_len != second.seq_len:
            raise DataError(f"cannot mix rows of {first.seq_len} and {second.seq_len} tokens")
        if not 0 < fraction < 1:
            raise DataError(f"a mixing fraction must be strictly between 0 and 1 (got {fraction})")
        self.first, self.second, self.fraction = first, second, float(fraction)
        n1, n2 = len(first), len(second)
        total = int(np.ceil(max(n1 / fraction, n2 / (1 - fraction))))
        k1 = int(round(total * fraction))
        # interleave the two sources evenly, so any window of the stream holds the stated proportion
        which = (np.floor((np.arange(total) + 1) * k1 / total) - np.floor(np.arange(total) * k1 / total)) > 0
        self._source = which  # True: first
        self._index = np.where(which, np.cumsum(which) - 1, np.cumsum(~which) - 1)
        self._index = np.where(which, self._index % n1, self._index % n2)
        self.meta = {
            "seq_len": first.seq_len,
            "fingerprint": hashlib.sha256(
                f"mix:{first.fingerprint}:{second.fingerprint}:{fraction}".encode()
            ).hexdigest(),
        }

    @property
    def seq_len(self) -> int:
        return self.first.seq_len

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def __len__(self) -> int:
        return len(self._source)

    @property
    def num_base_rows(self) -> int:
        return self.first.num_base_rows + self.second.num_base_rows

    @property
    def base_fingerprint(self) -> str:
        return hashlib.sha256(
            f"mix:{self.first.base_fingerprint}:{self.second.base_fingerprint}".encode()
        ).hexdigest()

    def absolute_rows(self, idx: np.ndarray | list[int]) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        src, i = self._source[idx], self._index[idx]
        a = self.first.absolute_rows(i[src]) if src.any() else np.zeros(0, np.int64)
        b = (
            self.second.absolute_rows(i[~src]) + self.first.num_base_rows
            if (~src).any()
            else np.zeros(0, np.int64)
        )
        out = np.empty(len(idx), np.int64)
        out[src], out[~src] = a, b
        return out

    def batch(self, idx: np.ndarray | list[int]) -> dict[str, Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        src, i = self._source[idx], self._index[idx]
        out: dict[str, Tensor] = {}
        for mask, corpus in ((src, self.first), (~src, self.second)):
            if not mask.any():
                continue
            where = torch.from_numpy(np.nonzero(mask)[0])
            for key, value in corpus.batch(i[mask]).items():
                out.setdefault(key, torch.empty((len(idx), self.seq_len), dtype=value.dtype))[where] = value
        return out

    def tensors(self) -> dict[str, Tensor]:
        return self.batch(np.arange(len(self)))


def batch_from_flags(tokens: np.ndarray, flags: np.ndarray) -> dict[str, Tensor]:
    T = tokens.shape[1]
    idx = np.arange(T)
    last_start = np.maximum.accumulate(np.where(flags & START, idx, 0), axis=1)
    return {
        "input_ids": torch.from_numpy(tokens.astype(np.int64)),
        "position_ids": torch.from_numpy(idx - last_start),
        "attention_mask": torch.from_numpy((flags & ATTN).astype(np.int64)),
        "loss_mask": torch.from_numpy(((flags & LOSS) >> 1).astype(np.int64)),
    }


def packed_to_cu_seqlens(position_ids: Tensor) -> Tensor:
    """Segment offsets `[N+1]` (int64) of the flattened `[B, T]` batch: a segment starts at every row start
    and wherever the position does not step by +1 (transformers' packed-sequence rule).

    >>> packed_to_cu_seqlens(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]))
    tensor([ 0,  3,  5,  7, 10])
    """
    B, T = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = torch.nonzero(starts.reshape(-1)).reshape(-1)
    return torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int64)


# -------------------------------------------------------------------------------------------- high level


def build_corpus(
    sources: str | Path | Iterable[str | Path],
    tokenizer,
    seq_len: int,
    *,
    teacher=None,
    cache_dir: str | Path | None = None,
    text_split: TextSplit = "auto",
    text_field: str = "text",
    split: str = "train",
    add_eos: bool = False,
    chat_method: Method = "auto",
    template_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> PackedCorpus:
    """Read, tokenize and pack data files (`sources.py` formats). With `cache_dir` the packed rows are kept
    there (memory-mapped, keyed by files + tokenizer + settings) and reused; without, they stay in memory.

    >>> corpus = build_corpus("data/", tok, 512, teacher=teacher, cache_dir="runs/.cache/data")
    >>> train, heldout = corpus.split(64)
    >>> loader = PackedLoader(train, batch_size=8, seed=0, rank=rank, world_size=world)
    """
    if teacher is not None:
        check_tokenizer_vocab(tokenizer, teacher)
    paths = resolve_sources(sources)
    settings = [
        FORMAT_VERSION,
        seq_len,
        text_split,
        text_field,
        split,
        add_eos,
        chat_method,
        sorted((template_kwargs or {}).items()),
    ]
    key = hashlib.sha256(
        json.dumps([sources_fingerprint(paths), tokenizer_fingerprint(tokenizer), repr(settings)]).encode()
    ).hexdigest()
    pad_id = pad_token_id(tokenizer)
    raw = iter_documents(paths, text_split=text_split, text_field=text_field, split=split)
    docs = tokenize_documents(
        raw, tokenizer, add_eos=add_eos, chat_method=chat_method, template_kwargs=template_kwargs
    )
    if cache_dir is None:
        corpus = pack_documents(docs, seq_len, pad_id=pad_id, fingerprint=key, progress=progress)
    else:
        folder = Path(cache_dir) / f"packed-{key[:20]}"
        if not (folder / "meta.json").is_file():
            _build_atomically(
                folder,
                lambda tmp: pack_documents(
                    docs, seq_len, pad_id=pad_id, folder=tmp, fingerprint=key, progress=progress
                ),
            )
        corpus = PackedCorpus.load(folder)
    if len(corpus) == 0:
        raise DataError(f"no tokens in {', '.join(map(str, paths))}")
    return corpus


def _build_atomically(folder: Path, build) -> None:
    """Build into a temporary sibling and rename it into place: readers never see half a cache."""
    try:
        write_folder(folder, build)
    except OSError as e:
        if not (folder / "meta.json").is_file():  # otherwise a concurrent builder won the rename
            raise DataError(f"could not write the packed data cache {folder}: {e}") from e


# ------------------------------------------------------------------------------------------------ loader


class PackedLoader:
    """Endless (or `epochs`-long) iterator over this rank's micro-batches; see the module docstring."""

    def __init__(
        self,
        corpus: PackedCorpus,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        with_row_ids: bool = False,
    ):
        if len(corpus) == 0:
            raise DataError("the packed corpus is empty: nothing to iterate")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.corpus, self.batch_size, self.seed, self.shuffle = corpus, batch_size, seed, shuffle
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.with_row_ids = with_row_ids  # batch["row_ids"]: absolute rows, for a teacher cache
        self.consumed = 0  # global rows handed out to all ranks together
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.corpus)
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perms = {epoch: rng.permutation(n) if self.shuffle else np.arange(n)}
        return self._perms[epoch]

    def global_rows(self, start: int, count: int) -> np.ndarray:
        """Corpus row indices at stream positions [start, start + count)."""
        n = len(self.corpus)
        g = np.arange(start, start + count)
        out = np.empty(count, np.int64)
        for epoch in np.unique(g // n):
            sel = g // n == epoch
            out[sel] = self._perm(int(epoch))[g[sel] % n]
        return out

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, Tensor]:
        span = self.batch_size * self.world_size
        end = self.consumed + span
        if self.epochs is not None:
            end = min(end, self.epochs * len(self.corpus))
        mine = np.arange(self.consumed + self.rank, end, self.world_size)
        if len(mine) == 0:
            raise StopIteration
        rows = self.global_rows(int(mine[0]), int(mine[-1] - mine[0]) + 1)[:: self.world_size]
        self.consumed += span
        batch = self.corpus.batch(rows)
        if self.with_row_ids:
            batch["row_ids"] = torch.from_numpy(self.corpus.absolute_rows(rows))
        return batch

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless PackedLoader has no length; pass epochs= for a finite one")
        return -(-self.epochs * len(self.corpus) // (self.batch_size * self.world_size))

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": len(self.corpus),
            "fingerprint": self.corpus.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "shuffle", "num_rows", "fingerprint"):
            if state.get(key) != self.state_dict()[key]:
                raise DataError(
                    f"cannot resume the data stream: its {key} was {state.get(key)!r} at the checkpoint "
                    f"and is {self.state_dict()[key]!r} now; the data or its settings changed since. "
                    "Restore them, or start a new run"
                )
        self.consumed = int(state["consumed"])
