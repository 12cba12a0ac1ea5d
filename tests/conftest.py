"""Shared test setup: one torch thread (2 shared cores), fixed seeds, a `shared` fixture for ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARWKV_SHARED", REPO.parent / "shared"))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared() -> Path:
    """Path to ../shared (real assets); skips the test when it is absent."""
    if not (SHARED / "assets").is_dir():
        pytest.skip(f"../shared assets not found at {SHARED} (set ARWKV_SHARED to point at them)")
    return SHARED


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (run on a GPU machine)"))
