"""Run a Python module or script with fla's kernels pinned first (and their compile seconds logged).

    python -m arwkv.ops.wkv7.with_pins -m arwkv convert --recipe ...
    python -m arwkv.ops.wkv7.with_pins benchmarks/distill_throughput.py --device cuda ...

The student's modeling file calls fla itself (it imports only torch and transformers), so the pins of
`fla_pin.py` have to be in place in the process before its first WKV call: this launcher applies them when
$ARWKV_FLA_PIN=1 and fla loads (one line says what it did, or why fla did not load), then runs the target
as `__main__` in the same process. With $ARWKV_FLA_COMPILE_LOG set, it writes the per-kernel compile seconds
of the run there as JSON when the target exits.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from collections import Counter
from pathlib import Path

COMPILE_LOG_ENV = "ARWKV_FLA_COMPILE_LOG"


def prepare() -> str:
    """Apply the pins if asked and fla loads; instrument the kernels; return the one-line summary."""
    from arwkv.ops.wkv7 import fla_pin
    from arwkv.ops.wkv7.fla import fla_problem, fla_version

    if not fla_pin.pin_requested():
        return f"fla pins: off ({fla_pin.PIN_ENV} unset)"
    problem = fla_problem()  # loads fla (and pins) when it can
    if problem is not None:
        return f"fla pins: not applied ({problem})"
    table = fla_pin.load_table()
    results = fla_pin.apply(table)
    counts = Counter(r.status for r in results)
    log = fla_pin.CompileLog()
    log.instrument(table["modules"])
    path = os.environ.get(COMPILE_LOG_ENV)
    if path:

        def dump() -> None:
            record = {
                "fla": fla_version(),
                "kernels": log.as_dict(),
                "autotuned": fla_pin.autotuned_kernels(),
            }
            Path(path).write_text(json.dumps(record, indent=2))

        atexit.register(dump)
    return f"fla pins: fla {fla_version()}, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    print(prepare(), flush=True)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
