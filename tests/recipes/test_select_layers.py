"""Layer selection: a mixer swapped into the teacher alone is exactly the one-RWKV-layer hybrid, a damaged
layer ranks as most harmful, `auto:K` resolves inside `arwkv convert`, and a K that does not fit is one
line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from toys import real_pair  # noqa: E402

from arwkv.cli import main  # noqa: E402
from arwkv.config import load_recipe  # noqa: E402
from arwkv.errors import ConfigError  # noqa: E402
from arwkv.recipes.select_layers import _Swap, auto_k, check_k, evenly_spaced, measure_harm  # noqa: E402
from arwkv.train.metrics import iter_batches  # noqa: E402


def _held(vocab=100, n=4, t=12):
    ids = torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids}


def test_auto_k_evenly_spaced_and_check_k():
    assert auto_k("auto:3") == 3 and auto_k([0, 2]) is None
    with pytest.raises(ConfigError, match="auto:K with K ≥ 1"):
        auto_k("auto:0")
    assert (
        evenly_spaced(30, 4) == [3, 11, 18, 26]
        and evenly_spaced(5, 1) == [2]
        and evenly_spaced(8, 2) == [2, 6]
    )
    with pytest.raises(ConfigError, match="K=5 does not fit a teacher with 5 layers"):
        check_k(5, 5)


def test_swapping_the_first_layer_in_alone_is_the_one_layer_hybrid():
    from arwkv.convert.build import build_student

    teacher, student = real_pair()  # 3 layers, RWKV everywhere
    torch.manual_seed(9)
    with torch.no_grad():
        for p in student.model.layers[0].self_attn.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a mixer that is not the copy init
    hybrid = build_student(teacher, init="copy", untie_embeddings=True, softmax_layers=[1, 2]).eval()
    mixer = {k: v for k, v in student.state_dict().items() if k.startswith("model.layers.0.self_attn.")}
    hybrid.load_state_dict({**hybrid.state_dict(), **mixer})
    hybrid.lm_head.weight.data.copy_(teacher.lm_head.weight)  # the teacher's head, as in the swapped teacher
    swap = _Swap(teacher, student.eval())
    swap.set_layer(0)
    batch = next(iter_batches(_held(), 4))
    with torch.no_grad():
        got = swap.model(input_ids=next(swap.batches([batch]))["input_ids"]).logits
        want = hybrid(input_ids=batch["input_ids"]).logits
        plain = teacher(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the swap really changed the teacher


def test_a_damaged_layer_is_ranked_most_harmful():
    teacher, student = real_pair()
    with torch.no_grad():
        for p in student.model.layers[1].self_attn.parameters():
            p.mul_(4.0)
    harm = measure_harm(teacher, student, _held(), batch_size=2)
    assert sorted(harm) == [0, 1, 2]
    assert max(harm, key=lambda i: harm[i]["kl"]) == 1
    assert all(h["kl"] > 0 for h in harm.values())


SELECT = [
    "select.align_tokens=256",
    "select.heldout_sequences=4",
]


def _teacher(shared) -> str:
    return f"teacher.path={shared / 'assets/llama2c-stories260K/stories260K.bin'}"


@pytest.mark.slow
def test_convert_with_auto_softmax_layers(shared, tmp_path, capsys, tiny_stages):
    run = tmp_path / "st"
    args = [
        "convert",
        "--recipe",
        "stories260k",
        _teacher(shared),
        f"out_dir={run}",
        "student.softmax_layers=auto:2",
    ]
    assert main(args + tiny_stages + SELECT) == 0
    summary = json.loads((run / "summary.json").read_text())
    sel = summary["layer_selection"]
    assert sel["k"] == 2 and len(sel["selected"]) == 2 and sorted(sel["ranking"]) == [0, 1, 2, 3, 4]
    assert sel["selected"] == sorted(sel["ranking"][:2]) and sel["cost"]["align_tokens"] == 256
    final = json.loads((run / "final" / "config.json").read_text())
    assert final["softmax_layers"] == sel["selected"]
    assert load_recipe(run / "config.yaml").student.softmax_layers == sel["selected"]
    assert (run / "select_layers" / "ranking.png").stat().st_size > 0
    assert "| rank | layer | KL |" in (run / "select_layers" / "ranking.md").read_text()
    assert f"chosen by measurement (auto:2): {sel['selected']}" in (run / "report.md").read_text()
    # the CLI verb reads the same ranking (measured once)
    before = (run / "select_layers" / "ranking.json").stat().st_mtime_ns
    code = main(
        ["select-layers", "--k", "1", "--recipe", "stories260k", _teacher(shared), f"out_dir={run}"]
        + tiny_stages
        + SELECT
    )
    assert code == 0 and f"softmax layers (K=1): [{sel['ranking'][0]}]" in capsys.readouterr().out
    assert (run / "select_layers" / "ranking.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("k", ["5", "9"])
def test_k_larger_than_the_layers_is_one_line(shared, tmp_path, capsys, k, tiny_stages):
    args = [
        "select-layers",
        "--k",
        k,
        "--recipe",
        "stories260k",
        _teacher(shared),
        f"out_dir={tmp_path / 'r'}",
    ]
    assert main(args + tiny_stages + SELECT) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "[arwkv]" in x]
    assert (
        len(lines) == 1
        and "Traceback" not in err
        and f"K={k} does not fit a teacher with 5 layers" in lines[0]
    )
    assert not (tmp_path / ".cache").exists()  # refused before any sampling
