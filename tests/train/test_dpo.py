"""DPO on tiny models: the loss and its gradients equal a hand computation (policy ≠ reference, padded batch,
completion tokens only), the reference gets no gradient, a resumed run equals an uninterrupted one, and 2 DDP
processes equal 1."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from toys import real_pair, stage_cfg

from arwkv.config import DPOConfig
from arwkv.data.packing import PackedLoader
from arwkv.data.preferences import from_pairs
from arwkv.recipes.dpo import DPOTask, frozen_reference, pair_metrics, run_dpo
from arwkv.train.loop import TrainingInterrupted, train
from arwkv.train.losses import dpo_loss


def _pairs(n=6, vocab=100, seed=0):
    """Pairs of varied prompt and completion lengths (so batches are right-padded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = 2 + i % 3
        c, r = 3 + (i % 4), 1 + (i * 2) % 5
        ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
        prompt = ids(p)
        out.append((prompt, ids(c), prompt, ids(r)))
    return from_pairs(out, pad_id=0)


def _perturbed(student, seed=5, scale=0.05):
    """Move the policy away from its reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return student


def _hand_logp(model, ids, prompt, length):
    """Sum of log p(token t | tokens < t) for t in [prompt, length), one unpadded row at a time."""
    logits = model(input_ids=ids[None, :length]).logits[0].float()
    logp = F.log_softmax(logits, -1)
    return sum(logp[t - 1, ids[t]] for t in range(prompt, length))


def test_dpo_loss_closed_form():
    pc, pr = torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([-4.0, -0.5, -2.0])
    rc, rr = torch.tensor([-3.5, -1.0, -1.0]), torch.tensor([-3.5, -1.0, -1.0])
    total, n, ex = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = [0.5 * (0.5 - (-0.5)), 0.5 * (0.0 - 0.5), 0.5 * (-1.0 - (-1.0))]
    assert n.item() == 3
    assert total.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins), rel=1e-6)
    assert ex["margin"].item() == pytest.approx(sum(margins))
    assert ex["reward_acc"].item() == 1.5  # one right, one wrong, one tie (½)
    assert ex["chosen_reward"].item() == pytest.approx(0.5 * (0.5 + 0.0 - 1.0))


def test_dpo_loss_and_gradients_equal_hand_computation():
    teacher, student = real_pair()
    reference = frozen_reference(student)
    _perturbed(student)
    pairs = _pairs()
    batch = pairs.batch([0, 1, 2, 3, 4, 5])
    assert (batch["attention_mask"] == 0).any()  # padded rows
    beta = 0.3
    task = DPOTask(student, reference, beta=beta, chunk_size=5)  # several chunks
    total, n, extras = task(batch)
    total.backward()
    got = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    hand, margins = 0.0, []
    for i in range(len(pairs)):
        lp = {}
        for side in ("chosen", "rejected"):
            ids, prompt, length = (
                getattr(pairs, side)[i],
                int(getattr(pairs, f"{side}_prompt")[i]),
                int(getattr(pairs, f"{side}_len")[i]),
            )
            with torch.no_grad():
                ref = _hand_logp(reference, ids, prompt, length)
            lp[side] = _hand_logp(student, ids, prompt, length) - ref
        m = beta * (lp["chosen"] - lp["rejected"])
        margins.append(m.item())
        hand = hand - F.logsigmoid(m)
    hand.backward()

    assert n.item() == 6
    assert total.item() == pytest.approx(hand.item(), rel=1e-5, abs=1e-6)
    assert extras["margin"].item() == pytest.approx(sum(margins), rel=1e-4, abs=1e-5)
    assert any(abs(m) > 1e-3 for m in margins)  # the policy really differs from the reference
    assert got.keys() == {k for k, p in student.named_parameters() if p.grad is not None}
    for k, p in student.named_parameters():
        if p.grad is not None:
            # fp32 sums over a padded batch and over single rows round differently (by shape and CPU):
            # ~1e-5 absolute on gradients of size ~10 here, so the floor scales with the gradient
            atol = 1e-5 * p.grad.abs().max().item()
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=atol, msg=k)


def test_padding_and_prompt_tokens_do_not_count():
    teacher, student = real_pair()
    reference = frozen_reference(student)
    _perturbed(student)
    pairs = _pairs()
    task = DPOTask(student, reference, beta=0.1)
    batch = pairs.batch([0, 1, 2])
    with torch.no_grad():
        base = task(batch)[0]
        other = {k: v.clone() for k, v in batch.items()}
        pad = other["attention_mask"] == 0
        other["input_ids"][pad] = 7  # whatever sits in the padding
        assert pad.any()
        assert torch.equal(task(other)[0], base)
    # the loss mask covers exactly the completion tokens of each row
    lm = batch["loss_mask"]
    for i, side in enumerate(["chosen"] * 3 + ["rejected"] * 3):
        j = i % 3
        prompt, length = int(getattr(pairs, f"{side}_prompt")[j]), int(getattr(pairs, f"{side}_len")[j])
        assert lm[i].nonzero().squeeze(-1).tolist() == list(range(prompt, length))


def test_reference_gets_no_gradient_and_never_changes(tmp_path):
    teacher, student = real_pair()
    reference = frozen_reference(student)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    task = DPOTask(student, reference, beta=0.1)
    assert not any(k.startswith("reference") for k in task.state_dict())  # not saved in checkpoints
    assert all(not p.requires_grad for p in reference.parameters())
    loader = PackedLoader(_pairs(8), 2, seed=0)
    cfg = DPOConfig(**{**stage_cfg(max_steps=4, lr=1e-2).__dict__, "loss": "dpo", "enabled": True})
    res = run_dpo(student, reference, loader, cfg, tmp_path, heldout=_pairs(4, seed=3))
    assert all(p.grad is None for p in reference.parameters())
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k]), k
    # step 1: policy = reference, so the margin is exactly 0 and the loss log 2
    first = res.history[0]
    assert first["margin"] == 0.0 and first["reward_acc"] == 0.5
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.history[-1]["margin"] > 0  # training separates chosen from rejected
    rec = json.loads((tmp_path / "pairs.json").read_text())
    assert rec["before"]["reward_acc"] == 0.5 and rec["after"]["pairs"] == 4
    assert (tmp_path / "dpo_curves.png").stat().st_size > 0


def test_pair_metrics_of_the_reference_itself():
    teacher, student = real_pair()
    m = pair_metrics(student, frozen_reference(student), _pairs(5), beta=0.1)
    assert m["reward_acc"] == 0.5 and m["margin"] == 0.0 and m["loss"] == pytest.approx(math.log(2))
    assert 0.0 <= m["logp_acc"] <= 1.0 and m["pairs"] == 5


def _run(tmp, cfg, on_step=None):
    teacher, student = real_pair()
    reference = frozen_reference(student)  # the entering student, before the loop restores anything
    loader = PackedLoader(_pairs(10), cfg.batch_size // cfg.grad_accum, seed=0)
    task = DPOTask(student, reference, beta=0.5)
    return student, train(task, loader, cfg, tmp, on_step=on_step)


def test_interrupted_and_resumed_dpo_equals_uninterrupted(tmp_path):
    cfg = lambda: stage_cfg(max_steps=6, batch_size=4, grad_accum=2, lr=1e-2)  # noqa: E731
    torch.manual_seed(7)
    s_full, full = _run(tmp_path / "a", cfg())

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    torch.manual_seed(7)
    with pytest.raises(TrainingInterrupted) as stopped:
        _run(tmp_path / "b", cfg(), interrupt)
    assert stopped.value.checkpoint.name == "step_000003"
    torch.manual_seed(999)  # a new process: the checkpoint's state must win
    s_rest, rest = _run(tmp_path / "b", cfg())
    assert [r["loss"] for r in full.history][3:] == [r["loss"] for r in rest.history]
    assert [r["margin"] for r in full.history][3:] == [r["margin"] for r in rest.history]
    for (name, a), b in zip(s_full.state_dict().items(), s_rest.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """DDP, 2 gloo processes: the loss and margin curve of 1 process at the same global batch of pairs."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_dpo_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(worker), str(one), str(tmp_path / "r1"), "2"], check=True, env=env)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(worker), str(two), str(tmp_path / "r2"), "1"],
        check=True,
        env=env,
        timeout=600,
    )
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world"], b["world"]) == (1, 2) and len(a["losses"]) == 4
    assert a["losses"][0] != pytest.approx(math.log(2))  # policy ≠ reference
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)
    assert a["margins"] == pytest.approx(b["margins"], rel=1e-4, abs=1e-5)
    for k, v in a["weights"].items():
        assert v == pytest.approx(b["weights"][k], rel=1e-3, abs=1e-3), k
