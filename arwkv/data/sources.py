"""Read documents from data files, lazily: plain text, jsonl, parquet, Hugging Face datasets saved to disk.

A *document* is the unit whose boundaries reset the student's recurrent state. Where one ends:

* plain text (`.txt`, `.text`, `.md`, `.raw`): at every `<|endoftext|>` (TinyStories' separator). With
  `text_split="auto"` (default) a file without separators is one document; `"paragraph"` also splits at
  blank lines; `"line"` makes every non-empty line a document (TinyStories-valid: one story per line).
  A document longer than `max_chars` characters is emitted in pieces cut at line ends, so a multi-GB file
  never has to fit in memory (each piece is then a document of its own; the packer cuts long documents
  anyway).
* jsonl (`.jsonl`, `.ndjson`): one JSON object per line with a `text` string or a chat `messages` list
  (`[{"role": ..., "content": ...}, ...]`; ShareGPT `conversations` with `from`/`value` is accepted too).
* parquet: a `messages` or a `text` column (`text_field` picks another name), read in record batches.
* a folder written by `datasets.save_to_disk`: rows as for parquet (memory-mapped by `datasets`).

Folders are searched recursively (sorted; hidden and .md files skipped); globs are expanded. Every failure
names the file (and line), and says what to do.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from arwkv.errors import DataError

EOT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
HF_DATASET_MARKERS = ("dataset_dict.json", "state.json")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
TextSplit = Literal["auto", "paragraph", "line"]


@dataclass(frozen=True)
class Document:
    """Exactly one of `text` / `messages` is set. `origin` says where it came from (file:line) for errors."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    origin: str = ""


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_DATASET_MARKERS)


def _supported(path: Path, walking: bool = False) -> bool:
    # folder scans skip .md: data folders carry README/SOURCE notes; name a .md file to read it
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    return path.suffix.lower() in suffixes and not (walking and path.suffix.lower() == ".md")


def _walk(folder: Path) -> Iterator[Path]:
    if is_hf_dataset_dir(folder):
        yield folder
        return
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _walk(child)
        elif _supported(child, walking=True):
            yield child


def resolve_sources(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """Data files (and HF dataset folders) named by paths, folders or globs, in a deterministic order."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    found: list[Path] = []
    for s in specs:
        text = str(s)
        path = Path(text).expanduser()
        if any(c in text for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            hits = [f for m in matches for f in (_walk(m) if m.is_dir() else [m] if _supported(m) else [])]
            if not hits:
                raise DataError(f"no data files match {text!r} (supported: {_suffix_list()})")
            found += hits
        elif path.is_dir():
            hits = list(_walk(path))
            if not hits:
                raise DataError(
                    f"folder {path} holds no data files (supported: {_suffix_list()}, "
                    "or a folder written by datasets' save_to_disk)"
                )
            found += hits
        elif path.is_file():
            if not _supported(path):
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; supported: {_suffix_list()}")
            found.append(path)
        else:
            raise DataError(f"data path {path} does not exist")
    return list(dict.fromkeys(found))  # a file named twice is read once


def _suffix_list() -> str:
    return ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)


def sources_fingerprint(paths: Iterable[Path]) -> str:
    """Changes when any file is edited, replaced, added or removed (path, size, mtime)."""
    h = hashlib.sha256()
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def iter_documents(
    spec: str | Path | Iterable[str | Path],
    *,
    text_split: TextSplit = "auto",
    text_field: str = "text",
    split: str = "train",
    max_chars: int = 1 << 20,
) -> Iterator[Document]:
    """Every document of every source, in order, read lazily.

    >>> for doc in iter_documents(["data/stories.txt", "data/chats.jsonl"]):
    ...     print(doc.text or doc.messages)
    """
    for path in resolve_sources(spec):
        yield from iter_file(
            path, text_split=text_split, text_field=text_field, split=split, max_chars=max_chars
        )


def iter_file(
    path: Path,
    *,
    text_split: TextSplit = "auto",
    text_field: str = "text",
    split: str = "train",
    max_chars: int = 1 << 20,
) -> Iterator[Document]:
    """Documents of one source; raises `DataError` naming the file when it is empty or unreadable."""
    if is_hf_dataset_dir(path):
        reader = _iter_hf_dataset(path, text_field, split)
    else:
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            reader = _iter_parquet(path, text_field)
        elif suffix in JSONL_SUFFIXES:
            reader = _iter_jsonl(path, text_field)
        else:
            reader = _iter_text(path, text_split, max_chars)
    n = 0
    try:
        for doc in reader:
            n += 1
            yield doc
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 text ({e.reason}); convert it to UTF-8 or remove it from the data"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if n == 0:
        raise DataError(f"{path} is empty: it contains no documents; remove it from the data or fill it")


def _iter_text(path: Path, text_split: TextSplit, max_chars: int) -> Iterator[Document]:
    if text_split not in ("auto", "paragraph", "line"):
        raise DataError(f"text_split must be 'auto', 'paragraph' or 'line', not {text_split!r}")
    buf: list[str] = []
    size, start = 0, 1

    def flush(lineno: int) -> Iterator[Document]:
        nonlocal buf, size, start
        text = "".join(buf).strip()
        if text:
            yield Document(text=text, origin=f"{path}:{start}")
        buf, size, start = [], 0, lineno

    with path.open("r", encoding="utf-8", newline=None) as f:
        for lineno, line in enumerate(f, 1):
            if text_split == "line":
                if line.strip():
                    yield Document(text=line.strip(), origin=f"{path}:{lineno}")
                continue
            if text_split == "paragraph" and not line.strip():
                yield from flush(lineno + 1)
                continue
            first, *rest = line.split(EOT)
            buf.append(first)
            size += len(first)
            for part in rest:  # each separator ends the document before it
                yield from flush(lineno)
                buf.append(part)
                size += len(part)
            if size >= max_chars:  # bounded memory: cut an over-long document at this line end
                yield from flush(lineno + 1)
    yield from flush(0)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be one object"
                ) from e
            doc = row_to_document(row, text_field, f"{path}:{lineno}")
            if doc is not None:
                yield doc


def row_to_document(row: Any, text_field: str, origin: str) -> Document | None:
    """A record with `messages` (or ShareGPT `conversations`) or a text field; None for an empty text."""
    if not isinstance(row, dict):
        raise DataError(
            f"{origin}: expected a JSON object with {text_field!r} or 'messages', got {type(row).__name__}"
        )
    if row.get("messages") is not None:
        return Document(messages=check_messages(row["messages"], origin), origin=origin)
    if row.get("conversations") is not None:
        return Document(messages=_from_sharegpt(row["conversations"], origin), origin=origin)
    if text_field in row:
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{origin}: field {text_field!r} must be a string, got {type(text).__name__}")
        return Document(text=text, origin=origin) if text.strip() else None
    raise DataError(
        f"{origin}: record has neither {text_field!r} nor 'messages' (keys: {sorted(row)}); "
        "set text_field to the column that holds the text"
    )


def check_messages(messages: Any, origin: str) -> list[dict[str, Any]]:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise DataError(f"{origin}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    return [dict(m) for m in messages]


def _from_sharegpt(turns: Any, origin: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t for t in turns):
        raise DataError(f"{origin}: 'conversations' must be a list of {{'from': ..., 'value': ...}}")
    out = []
    for t in turns:
        if t["from"] not in SHAREGPT_ROLES:
            raise DataError(
                f"{origin}: unknown ShareGPT speaker {t['from']!r} (known: {sorted(SHAREGPT_ROLES)})"
            )
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value", "")})
    return check_messages(out, origin)


def _pick_column(columns: list[str], text_field: str, where: str) -> str:
    for c in ("messages", "conversations", text_field):
        if c in columns:
            return c
    raise DataError(
        f"{where} has no 'messages' or {text_field!r} column (columns: {columns}); "
        "set text_field to the column that holds the text"
    )


def _iter_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
        raise DataError(f"cannot read {path} as parquet: {e}") from e
    col = _pick_column(pf.schema_arrow.names, text_field, str(path))
    i = 0
    for batch in pf.iter_batches(batch_size=256, columns=[col]):
        for value in batch.column(0).to_pylist():
            i += 1
            doc = row_to_document({col: value}, text_field, f"{path}:row {i}")
            if doc is not None:
                yield doc


def _iter_hf_dataset(path: Path, text_field: str, split: str) -> Iterator[Document]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError / arrow errors
        raise DataError(f"cannot load the Hugging Face dataset saved at {path}: {e}") from e
    if isinstance(ds, DatasetDict):
        if split not in ds and len(ds) != 1:
            raise DataError(f"{path} has splits {list(ds)}, not {split!r}; pass split= to choose one")
        ds = ds[split] if split in ds else next(iter(ds.values()))
    col = _pick_column(list(ds.column_names), text_field, str(path))
    i = 0
    for batch in ds.select_columns([col]).iter(batch_size=256):
        for value in batch[col]:
            i += 1
            doc = row_to_document({col: value}, text_field, f"{path}:row {i}")
            if doc is not None:
                yield doc
