"""tools/compare_runs.py: held-out curves of several run folders, tokens counted across stages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compare_runs.py"
spec = importlib.util.spec_from_file_location("compare_runs", TOOL)
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _run(folder: Path, ratio: float) -> Path:
    ev = lambda r: {"nll_ratio": r, "kl": r - 1}  # noqa: E731
    stages = {
        "align": {"before": ev(3.0), "after": ev(2.0), "tokens": 100, "tokens_per_s": 50.0},
        "distill": {"before": ev(2.0), "after": ev(ratio), "tokens": 300, "tokens_per_s": 25.0},
    }
    (folder / "distill").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"stages": stages}))
    rows = [{"step": 1, "tokens": 150, "loss": 1.0}]
    rows.append({"step": 2, "tokens": 150, "eval/nll_ratio": 1.8, "eval/kl": 0.8})
    (folder / "distill" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_compare_runs_tables_and_plots(tmp_path, capsys):
    a, b = _run(tmp_path / "a", 1.5), _run(tmp_path / "b", 1.25)
    assert [p["tokens"] for p in compare_runs.curve(a)] == [0, 100, 250, 400]  # distill tokens after align's
    assert compare_runs.main([f"v7={a}", f"v6={b}", "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| v7 | 50 | 25 | 1.5000 | 0.5000 |" in md and "| v6 | 50 | 25 | 1.2500 | 0.2500 |" in md
    assert "| 250 | distill | 1.800 / 0.800 | 1.800 / 0.800 |" in md
    assert (tmp_path / "out" / "heldout_compare.png").stat().st_size > 1000
