"""fla adapter on CPU: the version check's one line, the pin table, and the pin shim's narrowing of Triton's
autotuner (with triton importable only: a real `triton.autotune` kernel run in Triton's CPU interpreter)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import pytest
import torch

from arwkv.ops import wkv7
from arwkv.ops.wkv7 import Wkv7InputError, fla_pin
from arwkv.ops.wkv7.fla import FLA_REQUIRED, FlaVersionError, check_fla, fla_problem

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (GPU machines have it)")


# ---------------------------------------------------------------------------------------------- version
@pytest.mark.parametrize("version", ["0.4.2", "0.5.0", "0.5.2", "0.3.2"])
def test_buggy_or_old_fla_is_refused_in_one_line(version):
    with pytest.raises(FlaVersionError) as e:
        check_fla(version)
    msg = str(e.value)
    assert "\n" not in msg and f"fla {version} is installed" in msg and FLA_REQUIRED in msg
    assert "#1085" in msg and "pip install" in msg


def test_newer_fla_is_refused_and_the_range_is_accepted():
    with pytest.raises(FlaVersionError, match=r"fla 0\.7\.0 is installed .*>=0\.6\.0,<0\.7"):
        check_fla("0.7.0")
    assert check_fla("0.6.0") == "0.6.0" and check_fla("0.6.3rc1") == "0.6.3rc1"


def test_missing_fla_says_what_to_install(monkeypatch):
    adapter = importlib.import_module("arwkv.ops.wkv7.fla")  # (arwkv.ops.wkv7 the attribute is the op)

    monkeypatch.setattr(adapter, "fla_version", lambda: None)
    with pytest.raises(FlaVersionError, match=r"not installed \(need fla >=0\.6\.0,<0\.7\): pip install"):
        check_fla()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_backend_fla_on_cpu_is_one_clear_line():
    assert fla_problem() == "fla's kernels need a CUDA device and none is available"
    x = torch.randn(1, 4, 1, 8)
    w = -torch.rand(1, 4, 1, 8)
    with pytest.raises(Wkv7InputError, match="needs CUDA tensors; use backend='chunked'"):
        wkv7(x, w, x, x, x, x, backend="fla")


def test_gpu_extra_excludes_the_buggy_fla_versions():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("gpu = ")]
    assert line.replace(" ", "") == 'gpu=["fla-core>=0.6.0,<0.7"]'  # admits no 0.4.x / 0.5.x


# ---------------------------------------------------------------------------------------------- table
def test_pin_table_is_complete_and_says_it_is_untuned():
    table = fla_pin.load_table()
    assert "UNTUNED" in " ".join(table["_doc"])
    assert table["fla"] == FLA_REQUIRED
    for name, entry in table["kernels"].items():
        assert entry["module"] in table["modules"], name
        assert entry["num_warps"] in (1, 2, 4, 8, 16, 32) and entry["num_stages"] in (1, 2, 3, 4), name
        assert all(isinstance(v, int) and v & (v - 1) == 0 for v in entry["kwargs"].values()), name
    # the kernels chunk_rwkv7's safe-gate path (forward and backward) and fused_recurrent_rwkv7 go through
    path = {k for k, e in table["kernels"].items() if "no safe_gate" not in e["path"]}
    assert (
        len(path) == 14
        and "chunk_dplr_fwd_kernel_o" in path
        and "fused_recurrent_dplr_delta_rule_fwd_kernel" in path
    )


def test_bad_table_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "pins.json"
    bad.write_text("{not json")
    with pytest.raises(fla_pin.FlaPinError, match="not valid JSON"):
        fla_pin.load_table(bad)
    monkeypatch.setenv(fla_pin.TABLE_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(fla_pin.FlaPinError, match="does not exist; set ARWKV_FLA_PIN_TABLE"):
        fla_pin.load_table()


def test_pin_env_switch(monkeypatch):
    monkeypatch.delenv(fla_pin.PIN_ENV, raising=False)
    assert not fla_pin.pin_requested()
    for value, on in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(fla_pin.PIN_ENV, value)
        assert fla_pin.pin_requested() is on


# ---------------------------------------------------------------------------------------------- shim
KERNEL_SOURCE = """
import triton
import triton.language as tl


@triton.heuristics({"EVEN": lambda args: args["n"] % 2 == 0})
@triton.autotune(
    configs=[
        triton.Config({"BLOCK": b}, num_warps=w, num_stages=s)
        for b in (16, 32)
        for w in (2, 4)
        for s in (2, 3)
    ],
    key=["n"],
)
@triton.jit
def fill_block(out, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offs, BLOCK + tl.zeros([BLOCK], dtype=tl.float32), mask=offs < n)
"""


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    """A module with one real heuristics+autotune+jit kernel, run by Triton's CPU interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (tmp_path / "arwkv_fake_fla_kernels.py").write_text(KERNEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("arwkv_fake_fla_kernels", None)
    module = importlib.import_module("arwkv_fake_fla_kernels")
    yield module
    fla_pin.restore()
    sys.modules.pop("arwkv_fake_fla_kernels", None)


def table_for(entry):
    kernels = {} if entry is None else {"fill_block": entry}
    return {"modules": ["arwkv_fake_fla_kernels"], "kernels": kernels, "fla": FLA_REQUIRED}


def launch(module, n=40):
    out = torch.zeros(n)
    module.fill_block[lambda meta: (-(-n // meta["BLOCK"]),)](out, n)
    return out


@needs_triton
def test_pinned_kernel_runs_its_one_config_without_benchmarking(fake_module, monkeypatch):
    tuner = fla_pin.find_autotuner(fake_module.fill_block)
    assert len(tuner.configs) == 8
    (result,) = fla_pin.apply(table_for({"kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 3}))
    assert (result.kernel, result.status, result.candidates) == ("fill_block", "pinned", 8)
    assert [fla_pin.config_dict(c) for c in tuner.configs] == [
        {"kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 3}
    ]

    def no_bench(*args, **kwargs):
        raise AssertionError("the autotuner benchmarked a pinned kernel")

    monkeypatch.setattr(tuner, "_bench", no_bench)
    assert torch.equal(launch(fake_module), torch.full((40,), 32.0))  # the pinned BLOCK did the work
    fla_pin.restore()
    assert len(tuner.configs) == 8


@needs_triton
def test_unpinned_kernel_would_benchmark(fake_module, monkeypatch):
    """The control: with its 8 configs the autotuner times candidates (what the pins remove)."""
    tuner = fla_pin.find_autotuner(fake_module.fill_block)
    benched = []

    def record(*args, config, **kwargs):
        benched.append(config)
        raise RuntimeError("stop after the first benchmark")

    monkeypatch.setattr(tuner, "_bench", record)
    with pytest.raises(RuntimeError, match="stop after the first benchmark"):
        launch(fake_module)
    assert len(benched) == 1


@needs_triton
def test_nearest_fallback_and_wrong_names(fake_module):
    tuner = fla_pin.find_autotuner(fake_module.fill_block)
    (r,) = fla_pin.apply(table_for({"kwargs": {"BLOCK": 64}, "num_warps": 8, "num_stages": 2}))
    assert r.status == "nearest" and r.config == {"kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 2}
    (r,) = fla_pin.apply(table_for(None))  # re-pins from the full list
    assert r.status == "fallback" and r.candidates == 8 and r.config["num_warps"] == 4
    assert r.config["num_stages"] == 2 and len(tuner.configs) == 1
    with pytest.raises(fla_pin.FlaPinError, match=r"meta-parameters \['BV'\] are not the ones"):
        fla_pin.apply(table_for({"kwargs": {"BV": 32}, "num_warps": 4, "num_stages": 2}))
    table = table_for(None)
    table["kernels"]["gone_kernel"] = {"kwargs": {}, "num_warps": 4, "num_stages": 2}
    with pytest.raises(fla_pin.FlaPinError, match="kernels this fla does not have: gone_kernel"):
        fla_pin.apply(table)


@needs_triton
def test_compile_log_counts_calls_and_names_the_running_kernel(fake_module):
    fla_pin.apply(table_for({"kwargs": {"BLOCK": 16}, "num_warps": 2, "num_stages": 2}))
    log = fla_pin.CompileLog()
    assert log.instrument(["arwkv_fake_fla_kernels"]) == 1
    assert log.instrument(["arwkv_fake_fla_kernels"]) == 0  # not wrapped twice
    seen = []
    tuner = fla_pin.find_autotuner(fake_module.fill_block)
    inner = tuner.fn.run

    def spy(*args, **kwargs):
        seen.append(log.current)
        return inner(*args, **kwargs)

    tuner.fn.run = spy
    assert torch.equal(launch(fake_module), torch.full((40,), 16.0))
    launch(fake_module, n=24)
    timing = log.kernels["fill_block"]
    assert seen == ["fill_block", "fill_block"] and log.current is None
    assert timing.calls == 2 and timing.total_s > 0
    log.uninstrument()
    assert "run" not in vars(tuner)


@pytest.mark.skipif(
    importlib.util.find_spec("fla") is None or not HAS_TRITON, reason="fla-core not installed"
)
def test_table_fits_the_installed_fla():
    """Every kernel the table names is in the installed fla; every autotuner there ends with one config."""
    try:
        results = fla_pin.apply()
        assert {r.kernel for r in results} >= set(fla_pin.load_table()["kernels"])
        assert {r.status for r in results} <= {"pinned", "nearest", "fallback"}
        for mod in fla_pin.load_table()["modules"]:
            for _, tuner in fla_pin.module_autotuners(importlib.import_module(mod)):
                assert len(tuner.configs) == 1
        print(json.dumps([r.__dict__ for r in results if r.status != "pinned"]))
    finally:
        fla_pin.restore()


def test_over_budget_warmup_stops_and_names_what_it_compiled(tmp_path):
    """The watchdog ends a warm-up whose compile runs past the budget, with one line and the JSON record."""
    import subprocess
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(
        """
        import sys, threading, time
        from arwkv.ops.wkv7.fla_pin import KernelTiming
        from arwkv.recipes.fla_warmup import Warmup

        w = Warmup(budget_s=1.0, json_path=sys.argv[1])
        # what the compile log holds after one kernel compiled and while a second one compiles
        w.log.kernels["chunk_dplr_fwd_kernel_h"] = KernelTiming("chunk_dplr_fwd_kernel_h", 1, 1, 2.5, 2.5)
        w.log.order.append("chunk_dplr_fwd_kernel_h")
        w.log.current, w.current = "chunk_dplr_fwd_kernel_o", "op chunk fwd+bwd H=9, final state"
        threading.Thread(target=w.watchdog, daemon=True).start()
        time.sleep(60)  # a compile that does not return
        print("not reached")
        """
    )
    record = tmp_path / "warmup.json"
    root = Path(__file__).parents[2]
    r = subprocess.run(
        [sys.executable, "-c", script, str(record)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert r.returncode == 3, r.stderr
    (line,) = r.stdout.strip().splitlines()
    assert line.startswith(
        "warm-up over its 1 s budget after 1 s, in signature 'op chunk fwd+bwd H=9, final state'"
    )
    assert (
        "(kernel chunk_dplr_fwd_kernel_o still compiling); compiled so far: chunk_dplr_fwd_kernel_h (2.5 s)"
        in line
    )
    data = json.loads(record.read_text())
    assert data["over_budget"] and data["running"]["kernel"] == "chunk_dplr_fwd_kernel_o"
    assert data["kernels"]["chunk_dplr_fwd_kernel_h"]["compile_s"] == 2.5
