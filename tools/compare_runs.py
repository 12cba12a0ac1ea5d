"""Compare conversion runs side by side: held-out NLL ratio and KL vs training tokens, and tokens/s per stage.

    python tools/compare_runs.py v7=runs/stories260k-v7 v6=runs/stories260k-v6 --out docs/results/x

Reads each run folder's summary.json (held-out before/after every stage, tokens/s) and the `eval/*` rows of
<stage>/metrics.jsonl; writes compare.md (tables), compare.json and heldout_compare.png into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ("align", "distill", "sft", "dpo")


def curve(run: Path) -> list[dict]:
    """(tokens trained so far, stage, nll_ratio, kl) at every held-out evaluation of the run, in order."""
    summary = json.loads((run / "summary.json").read_text())
    points, offset = [], 0
    for stage in STAGES:
        info = summary.get("stages", {}).get(stage)
        if not info or "before" not in info:
            continue
        if not points:
            points.append({"tokens": 0, "stage": "start", **_metrics(info["before"])})
        metrics = run / stage / "metrics.jsonl"
        text = metrics.read_text() if metrics.is_file() else ""
        rows = [json.loads(x) for x in text.splitlines() if x.strip()]
        for row in rows:
            if "eval/nll_ratio" in row:
                ev = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
                points.append({"tokens": offset + row["tokens"], "stage": stage, **_metrics(ev)})
        if "after" in info:
            end = offset + info.get("tokens", 0)
            if points[-1]["tokens"] != end:
                points.append({"tokens": end, "stage": stage, **_metrics(info["after"])})
        offset += info.get("tokens", 0)
    return points


def _metrics(d: dict) -> dict:
    return {"nll_ratio": d["nll_ratio"], "kl": d["kl"]}


def speeds(run: Path) -> dict[str, float]:
    summary = json.loads((run / "summary.json").read_text())
    stages = summary.get("stages", {})
    return {s: info["tokens_per_s"] for s, info in stages.items() if "tokens_per_s" in info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "summary.json").is_file():
            p.error(f"{item!r}: expected NAME=RUN_DIR with a summary.json in RUN_DIR")
        runs[name] = Path(path)
    data = {n: {"curve": curve(r), "tokens_per_s": speeds(r)} for n, r in runs.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(data, indent=1) + "\n")

    stages = [s for s in STAGES if any(s in d["tokens_per_s"] for d in data.values())]
    lines = ["| run | " + " | ".join(f"{s} tok/s" for s in stages) + " | final NLL ratio | final KL |"]
    lines.append("|---|" + "---:|" * (len(stages) + 2))
    for n, d in data.items():
        last = d["curve"][-1]
        tps = " | ".join(f"{d['tokens_per_s'].get(s, float('nan')):,.0f}" for s in stages)
        lines.append(f"| {n} | {tps} | {last['nll_ratio']:.4f} | {last['kl']:.4f} |")
    lines += ["", "| tokens | stage | " + " | ".join(f"{n} ratio / KL" for n in data) + " |"]
    lines.append("|---:|---|" + "---:|" * len(data))
    by_tokens: dict[int, dict] = {}
    for n, d in data.items():
        for pt in d["curve"]:
            by_tokens.setdefault(pt["tokens"], {"stage": pt["stage"]})[n] = pt
    for t in sorted(by_tokens):
        row = by_tokens[t]
        cells = [f"{row[n]['nll_ratio']:.3f} / {row[n]['kl']:.3f}" if n in row else "" for n in data]
        lines.append(f"| {t:,} | {row['stage']} | " + " | ".join(cells) + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("nll_ratio", "kl"), strict=True):
        for n, d in data.items():
            pts = [pt for pt in d["curve"] if pt["tokens"] > 0]
            ax.plot([pt["tokens"] for pt in pts], [pt[key] for pt in pts], marker="o", label=n)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"held-out {key.replace('_', ' ')}")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "heldout_compare.png", dpi=110)
    print(f"wrote {out / 'compare.md'}, compare.json, heldout_compare.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
