"""Keep the WKV kernel inlined in the student's modeling file identical to its source.

The student's `modeling_arwkv.py` ships as remote code and may import only torch and transformers, so the
chunked kernel of `arwkv/ops/wkv7/chunked.py` is copied into it verbatim between `# <wkv7-chunked>` markers.

    python tools/check_copies.py          # exit 1 (and say where) when the copies differ
    python tools/check_copies.py --fix    # rewrite the modeling file's block from the source
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "arwkv/ops/wkv7/chunked.py"
TARGET = REPO / "arwkv/models/arwkv/modeling_arwkv.py"
BEGIN, END = "# <wkv7-chunked>", "# </wkv7-chunked>"


def block_span(text: str, path: Path) -> tuple[int, int]:
    """Character span of the block between the marker lines (markers excluded)."""
    begin, end = text.find(BEGIN + "\n"), text.find(END)
    if begin < 0 or end < 0 or end < begin or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{path}: expected exactly one '{BEGIN}' ... '{END}' block")
    return begin + len(BEGIN) + 1, end


def extract(path: Path) -> str:
    text = path.read_text()
    start, stop = block_span(text, path)
    return text[start:stop]


def check(source: Path = SOURCE, target: Path = TARGET) -> bool:
    return extract(source) == extract(target)


def fix(source: Path = SOURCE, target: Path = TARGET) -> bool:
    """Rewrite the target block; True when it changed."""
    text = target.read_text()
    start, stop = block_span(text, target)
    new = text[:start] + extract(source) + text[stop:]
    if new == text:
        return False
    target.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--fix", action="store_true", help="rewrite the copy in the modeling file")
    args = parser.parse_args(argv)
    if args.fix:
        changed = fix()
        print(f"{TARGET.relative_to(REPO)}: {'updated' if changed else 'already in sync'}")
        return 0
    if check():
        return 0
    print(
        f"{TARGET.relative_to(REPO)}: the '{BEGIN}' block differs from {SOURCE.relative_to(REPO)}; "
        "run `python tools/check_copies.py --fix`",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
