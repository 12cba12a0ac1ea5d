"""Greedy chat replies of several models to the same prompts, as markdown.

python tools/side_by_side.py teacher=smollm2-135m-instruct student=runs/x/final --out replies.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "What should I cook for dinner tonight?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from arwkv.eval.harness import load_models
    from arwkv.recipes.demo import chat_reply

    names = [m.split("=", 1)[0] for m in args.models]
    specs = [m.split("=", 1)[1] for m in args.models]
    models = load_models(specs, names=names)
    lines = ["# The same prompts, greedy replies", ""]
    for prompt in PROMPTS:
        lines += [f"## {prompt}", ""]
        for name, (model, tok) in models.items():
            reply = chat_reply(model, tok, prompt, max_new_tokens=args.max_new_tokens)
            lines += [f"**{name}**:", "", "```text", reply or "(empty)", "```", ""]
            print(name, "|", prompt, "|", reply[:80].replace("\n", " "), flush=True)
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
