"""Errors arwkv raises on bad input. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class ArwkvError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in arwkv."""


class UnsupportedArchitectureError(ArwkvError):
    """The teacher's architecture is not one arwkv knows how to convert."""


class ConfigError(ArwkvError, ValueError):
    """A recipe or command-line key is unknown, mistyped or inconsistent."""


class DataError(ArwkvError):
    """A data file is missing, empty, unreadable or does not match the teacher's tokenizer."""


class CheckpointError(ArwkvError):
    """A checkpoint is missing, incomplete, or does not match the model it is loaded into."""


class TrainingDivergedError(ArwkvError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
