"""benchmarks/gpu_convert.sh on CPU: argument handling, the stash check, and the --dry-run output layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_convert.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_convert  # noqa: E402
from gpu_report import render  # noqa: E402


def sh(*args: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_STASH": str(tmp_path / "stash")}
    env["GPU_CARRY"] = str(tmp_path / "carry")  # not the checkout's own .gpu_carry
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_unknown_mode_is_one_line(tmp_path):
    r = sh("convert", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "gpu_convert: unknown mode convert: prepare, part1, part2 or all"
    ]


def test_part2_without_the_stash_of_part1_says_what_to_do(tmp_path):
    r = sh("part2", "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "no stash from part 1 on this machine" in line and "run part1, then part2 at once" in line


def test_part1_without_the_carried_half_says_so(tmp_path):
    r = sh("part1", "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert r.returncode == 2 and "no .gpu_carry/a here: run 'gpu_convert.sh prepare'" in r.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["part2", "--out", "o"], "part2 on the GPU needs --teacher FILE.gguf"),
        (["all", "--out", "o", "--minutes", "0"], "--minutes must be > 0"),
        (["part1", "--out", "o", "--dry-run", "distill.tokens"], "recipe overrides are key=value"),
        (
            ["all", "--out", "o", "--teacher", "/nonexistent.gguf"],
            "--teacher /nonexistent.gguf does not exist",
        ),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_convert.parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_part_minutes_fit_the_window():
    """part1 + part2 stay inside the ~9 minutes the two device commands have."""
    a = gpu_convert.parse(["part1", "--out", "o"])
    b = gpu_convert.parse(["part2", "--out", "o", "--dry-run"])
    assert a.minutes + b.minutes <= 9.5 and gpu_convert.parse(["all", "--out", "o", "--dry-run"]).minutes <= 9


def test_report_renders_what_the_summary_holds():
    summary = {
        "part": "all",
        "steps": {"warmup": {"status": "ok", "wall_s": 41.0}},
        "warmup": {
            "pinned": True,
            "elapsed_s": 41.0,
            "compile_s_total": 37.5,
            "over_budget": False,
            "autotuned": [],
            "kernels": {
                "chunk_dplr_fwd_kernel_o": {
                    "kernel": "chunk_dplr_fwd_kernel_o",
                    "compiles": 2,
                    "compile_s": 7.25,
                    "calls": 9,
                }
            },
            "signatures": [{"name": "op chunk fwd+bwd H=9, final state", "wall_s": 30.5}],
        },
        "parity": {
            "result": "5 passed in 20s",
            "errors": [{"case": "t", "name": "dw", "error": 3.1e-3, "tol": 1e-2}],
        },
    }
    md = render(summary)
    assert (
        "| chunk_dplr_fwd_kernel_o | 2 | 7.2 | 9 |" in md
        and "pinned configs; 41.0 s in all, 37.5 s compiling" in md
    )
    assert "| t | dw | 3.10e-03 | 1e-02 |" in md and "5 passed in 20s" in md
    assert md.count("not run") == 3  # throughput, conversion, evaluation


@pytest.mark.slow
def test_dry_run_writes_the_output_layout(shared, tmp_path):
    out = tmp_path / "out"
    r = sh("all", "--dry-run", "--out", str(out), tmp_path=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_convert.OUT_FILES)
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    status = {k: v["status"] for k, v in summary["steps"].items()}
    assert status == {
        "warmup": "skipped",
        "parity": "ok",
        "throughput": "ok",
        "wkv_vs_sdpa": "skipped",
        "convert": "ok",
        "eval": "ok",
    }
    assert summary["dry_run"] and summary["failed_step"] is None
    assert summary["throughput"]["stages"]["distill"]["tok_per_s"] > 0
    stages = summary["convert"]["summary"]["stages"]
    assert stages["distill"]["tokens"] > 0 and stages["distill"]["after"]["nll_ratio"] > 0
    assert set(summary["eval"]["results"]) == {"teacher", "swa", "student"}
    log = (out / "log.txt").read_text()
    assert (
        "[warmup] skipped: needs CUDA and fla (dry run)" in log and "[wkv_vs_sdpa] skipped: needs CUDA" in log
    )
    assert "fla pins: not applied (fla's kernels need a CUDA device" in log
    report = (out / "report.md").read_text()
    assert "dry run on CPU" in report and "| teacher |" in report and "Passkey retrieval" in report
