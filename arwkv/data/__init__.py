"""Data layer: documents from files, chat rendering with assistant masks, packing with per-document resets,
a seeded resumable sharded loader, and the data-free corpus the teacher writes itself."""

from __future__ import annotations

from arwkv.data.chat import render_chat
from arwkv.data.packing import (
    PackedCorpus,
    PackedLoader,
    build_corpus,
    check_tokenizer_vocab,
    pack_documents,
    packed_to_cu_seqlens,
)
from arwkv.data.sources import Document, iter_documents

# `teacher_corpus` (the function) is not re-exported: it would shadow the submodule of the same name
from arwkv.data.teacher_corpus import TeacherCorpus

__all__ = [
    "Document",
    "PackedCorpus",
    "PackedLoader",
    "TeacherCorpus",
    "build_corpus",
    "check_tokenizer_vocab",
    "iter_documents",
    "pack_documents",
    "packed_to_cu_seqlens",
    "render_chat",
]
