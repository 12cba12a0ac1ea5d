"""Keep the operator code inlined in the student's modeling file identical to its source in `arwkv/ops`.

The student's `modeling_arwkv.py` ships as remote code and may import only torch and transformers, so each
operator it needs is copied into it verbatim between `# <name>` ... `# </name>` markers:

- `wkv7-chunked`: the chunked WKV kernel of `arwkv/ops/wkv7/chunked.py`;
- `wkv7-dispatch`: the kernel choice (fla / native / decode step / chunked, chunk-size rule, fla adapter) of
  `arwkv/ops/wkv7/dispatch.py`, which `arwkv.ops.wkv7.wkv7` runs too;
- `wkv6-chunked`: the chunked RWKV-6 kernel and decode step of `arwkv/ops/wkv6/chunked.py`;
- `local-attention`: the sink + sliding-window attention of `arwkv/ops/local_attention.py`.

    python tools/check_copies.py          # exit 1 (and say where) when a copy differs
    python tools/check_copies.py --fix    # rewrite the modeling file's blocks from the sources
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "arwkv/models/arwkv/modeling_arwkv.py"
BLOCKS = {
    "wkv7-chunked": REPO / "arwkv/ops/wkv7/chunked.py",
    "wkv7-dispatch": REPO / "arwkv/ops/wkv7/dispatch.py",
    "wkv6-chunked": REPO / "arwkv/ops/wkv6/chunked.py",
    "local-attention": REPO / "arwkv/ops/local_attention.py",
}
SOURCE = BLOCKS["wkv7-chunked"]
BEGIN, END = "# <wkv7-chunked>", "# </wkv7-chunked>"


def markers(name: str) -> tuple[str, str]:
    return f"# <{name}>", f"# </{name}>"


def block_span(text: str, path: Path, name: str = "wkv7-chunked") -> tuple[int, int]:
    """Character span of the block between the marker lines (markers excluded)."""
    begin_mark, end_mark = markers(name)
    begin, end = text.find(begin_mark + "\n"), text.find(end_mark)
    if begin < 0 or end < 0 or end < begin or text.count(begin_mark) != 1 or text.count(end_mark) != 1:
        raise ValueError(f"{path}: expected exactly one '{begin_mark}' ... '{end_mark}' block")
    return begin + len(begin_mark) + 1, end


def extract(path: Path, name: str = "wkv7-chunked") -> str:
    text = path.read_text()
    start, stop = block_span(text, path, name)
    return text[start:stop]


def check(source: Path = SOURCE, target: Path = TARGET, name: str = "wkv7-chunked") -> bool:
    return extract(source, name) == extract(target, name)


def fix(source: Path = SOURCE, target: Path = TARGET, name: str = "wkv7-chunked") -> bool:
    """Rewrite the target block; True when it changed."""
    text = target.read_text()
    start, stop = block_span(text, target, name)
    new = text[:start] + extract(source, name) + text[stop:]
    if new == text:
        return False
    target.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--fix", action="store_true", help="rewrite the copies in the modeling file")
    args = parser.parse_args(argv)
    status = 0
    for name, source in BLOCKS.items():
        if args.fix:
            changed = fix(source, TARGET, name)
            print(f"{TARGET.relative_to(REPO)} <{name}>: {'updated' if changed else 'already in sync'}")
        elif not check(source, TARGET, name):
            print(
                f"{TARGET.relative_to(REPO)}: the '<{name}>' block differs from {source.relative_to(REPO)}; "
                "run `python tools/check_copies.py --fix`",
                file=sys.stderr,
            )
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
