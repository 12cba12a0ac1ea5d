"""`python -m lm_eval ...` with these task files, from any directory, checking their data first.

    python arwkv/eval/lm_eval_tasks/run_lm_eval.py --model hf \\
        --model_args pretrained=runs/x/final,trust_remote_code=True --tasks lambada_openai_local --limit 200

lm-eval loads the model before its tasks, so a missing data file would surface only after the model loaded;
this launcher checks the files of the requested local tasks first (one line, exit status 2), adds
`--include_path` for this folder, and hands every argument to lm-eval unchanged. Standard library only: run it
with the Python that has lm-eval installed.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _data_module():
    # loaded under a private name: lm-eval imports `utils.py` itself, by path, for the !function tags
    spec = importlib.util.spec_from_file_location("_arwkv_lm_eval_data", HERE / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requested_tasks(argv: list[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg == "--tasks" and i + 1 < len(argv):
            return argv[i + 1].split(",")
        if arg.startswith("--tasks="):
            return arg.split("=", 1)[1].split(",")
    return []


def main(argv: list[str]) -> int:
    data = _data_module()
    local = [t for t in requested_tasks(argv) if t in data.FILES]
    try:
        data.require(local)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("lm_eval") is None:
        print('error: lm-eval is not installed here: pip install "lm-eval[hf]"', file=sys.stderr)
        return 2
    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv):
        argv = [*argv, "--include_path", str(HERE)]
    sys.argv = ["lm_eval", *argv]
    runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
