"""Resuming never executes code from a run folder: optimizer.pt / rank<r>.pt are loaded as data only."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from arwkv.errors import CheckpointError
from arwkv.train import checkpoint as ckpt


class _Payload:
    ran = False

    def __reduce__(self):  # what a planted pickle would do on load
        return (exec, ("import tests.train.test_checkpoint_safety as m; m._Payload.ran = True",))


def _save(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt, ckpt.save_checkpoint(tmp_path, 1, model, opt, data_state={"consumed": 4})


def test_rng_and_optimizer_state_round_trip_as_plain_data(tmp_path):
    model, opt, path = _save(tmp_path)
    random.random(), np.random.rand(), torch.rand(1)  # move every generator
    state = ckpt.load_checkpoint(path, model, opt)
    assert state["data"] == {"consumed": 4}
    # the restored generators continue exactly where the saved ones were
    expect = ckpt.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(expect)
    assert a == (random.random(), float(np.random.rand()), float(torch.rand(1)))


@pytest.mark.parametrize("name", ["rank0.pt", "optimizer.pt"])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, name):
    model, opt, path = _save(tmp_path)
    torch.save({"rng": _Payload(), "data": None, "optimizer": _Payload()}, path / name)
    with pytest.raises(CheckpointError, match="will not execute"):
        ckpt.load_checkpoint(path, model, opt)
    assert not _Payload.ran
