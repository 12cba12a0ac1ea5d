"""Operator code inlined in the student's modeling file is a verbatim copy of its source in arwkv/ops."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("check_copies", REPO / "tools" / "check_copies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inlined_wkv_kernel_matches_ops():
    tool = load_tool()
    source = tool.extract(tool.SOURCE)
    assert "def wkv7_chunked(" in source
    assert source == tool.extract(tool.TARGET), "run `python tools/check_copies.py --fix`"


def test_fix_rewrites_a_stale_copy(tmp_path):
    tool = load_tool()
    target = tmp_path / "modeling.py"
    target.write_text(f"head\n{tool.BEGIN}\nstale = 1\n{tool.END}\ntail\n")
    assert not tool.check(tool.SOURCE, target)
    assert tool.fix(tool.SOURCE, target) and tool.check(tool.SOURCE, target)
    text = target.read_text()
    assert text.startswith("head\n") and text.endswith(f"{tool.END}\ntail\n") and "stale" not in text
    assert tool.main([]) in (0, 1)  # the CLI runs on the real files


def test_inlined_local_attention_matches_ops():
    tool = load_tool()
    source = tool.extract(tool.BLOCKS["local-attention"], "local-attention")
    assert "def sink_window_attention(" in source
    assert source == tool.extract(tool.TARGET, "local-attention"), "run `python tools/check_copies.py --fix`"


def test_inlined_wkv6_kernel_matches_ops():
    tool = load_tool()
    source = tool.extract(tool.BLOCKS["wkv6-chunked"], "wkv6-chunked")
    assert "def wkv6_chunked(" in source and "def wkv6_step(" in source
    assert source == tool.extract(tool.TARGET, "wkv6-chunked"), "run `python tools/check_copies.py --fix`"


def test_inlined_wkv7_dispatch_matches_ops_and_a_one_character_edit_fails(tmp_path):
    """The student chooses its WKV kernel with the dispatch `arwkv.ops.wkv7.wkv7` runs: one source."""
    tool = load_tool()
    source_path = tool.BLOCKS["wkv7-dispatch"]
    source = tool.extract(source_path, "wkv7-dispatch")
    assert "def wkv7_dispatch(" in source and "def wkv7_step(" in source and "def wkv7_fla_call(" in source
    assert source == tool.extract(tool.TARGET, "wkv7-dispatch"), "run `python tools/check_copies.py --fix`"
    edited = tmp_path / "dispatch.py"
    text = source_path.read_text()
    edited.write_text(text.replace('backend in ("native", "auto")', 'backend in ("native", "auto ")', 1))
    assert edited.read_text() != text
    assert not tool.check(edited, tool.TARGET, "wkv7-dispatch")


def test_ops_and_student_call_the_same_dispatch():
    import inspect

    from arwkv.models.arwkv import modeling_arwkv
    from arwkv.ops.wkv7 import wkv7

    assert "wkv7_dispatch(" in inspect.getsource(wkv7)
    assert "wkv7_dispatch(" in inspect.getsource(modeling_arwkv.wkv7)
