"""report.md and gpu_summary.png of benchmarks/gpu_convert.py from its summary dict (gaps say so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DISTILL_TARGET = 50_000  # tok/s for the 135M student on one H200 (issue 12): >= 10% of a teacher forward


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _env(s: dict) -> list[str]:
    env = s.get("env") or {}
    keys = (
        "device",
        "memory_gib",
        "torch",
        "triton",
        "fla",
        "transformers",
        "ARWKV_FLA_PIN",
        "TRITON_F32_DEFAULT",
    )
    return ["## Environment", "", ", ".join(f"{k} {env.get(k)}" for k in keys), ""]


def _steps(s: dict) -> list[str]:
    lines = ["## Steps", "", "| step | status | wall s | note |", "| --- | --- | ---: | --- |"]
    for name, st in s.get("steps", {}).items():
        lines.append(
            f"| {name} | {st.get('status')} | {_fmt(st.get('wall_s'), '.1f')} | {st.get('why', '')} |"
        )
    if s.get("failed_step"):
        lines += ["", f"**Stopped at step `{s['failed_step']}`** (log.txt has its output)."]
    return [*lines, ""]


def _warmup(s: dict) -> list[str]:
    w = s.get("warmup")
    if not w:
        return ["## Warm-up (Triton compile)", "", "not run", ""]
    lines = [
        "## Warm-up (Triton compile)",
        "",
        f"{'pinned configs' if w.get('pinned') else 'autotuned'}; {w.get('elapsed_s', 0):.1f} s in all, "
        f"{w.get('compile_s_total', 0):.1f} s compiling; over budget: {w.get('over_budget')}; "
        f"autotuned kernels: {', '.join(w.get('autotuned') or []) or 'none'}",
        "",
        "| kernel | compiles | compile s | calls |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k in sorted((w.get("kernels") or {}).values(), key=lambda k: -k["compile_s"]):
        lines.append(f"| {k['kernel']} | {k['compiles']} | {k['compile_s']:.1f} | {k['calls']} |")
    lines += ["", "| signature | wall s |", "| --- | ---: |"]
    lines += [f"| {x['name']} | {x['wall_s']:.1f} |" for x in w.get("signatures", [])]
    return [*lines, ""]


def _parity(s: dict) -> list[str]:
    p = s.get("parity") or {}
    lines = ["## Parity (fla vs the fp64 reference, relative RMS)", "", p.get("result") or "not run", ""]
    if p.get("errors"):
        lines += ["| test | tensor | error | tolerance |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {e['case']} | {e['name']} | {e['error']:.2e} | {e['tol']:.0e} |" for e in p["errors"]]
        lines.append("")
    return lines


def _throughput(s: dict) -> list[str]:
    t = s.get("throughput")
    lines = ["## Throughput (SmolLM2-135M shape)", ""]
    if not t:
        return [*lines, "not run", ""]
    lines += [
        f"{t['device']}, torch {t['torch']}, bf16={t['bf16']}, batch {t['batch']} x {t['seq_len']}",
        "",
        "| stage | tok/s | x teacher fwd | peak GiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in t["stages"].items():
        lines.append(
            f"| {name} | {r['tok_per_s']:,.0f} | {r['x_teacher_forward']:.2f} | "
            f"{_fmt(r['peak_gib'], '.1f')} |"
        )
    distill = t["stages"].get("distill", {}).get("tok_per_s")
    if distill is not None:
        lines += [
            "",
            f"distill target {DISTILL_TARGET:,} tok/s: {'met' if distill >= DISTILL_TARGET else 'missed'}",
        ]
    w = s.get("wkv_vs_sdpa")
    if w:
        cols = [c for c in w["rows"][0] if c not in ("B", "T", "H")]
        lines += ["", "WKV (fla) vs causal SDPA, ms:", "", "| B x T | " + " | ".join(cols) + " |"]
        lines.append("| --- |" + " ---: |" * len(cols))
        lines += [
            f"| {r['B']} x {r['T']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for r in w["rows"]
        ]
    return [*lines, ""]


def _convert(s: dict) -> list[str]:
    c = s.get("convert")
    lines = ["## Conversion (held-out teacher text)", ""]
    if not c or not c.get("summary"):
        return [*lines, "not run", ""]
    summ, plan = c["summary"], c.get("budget") or {}
    lines.append(
        f"budget.minutes {c['budget_minutes']}; planned tokens {plan.get('tokens')}; "
        f"rates (tok/s) {plan.get('rates')}"
    )
    lines += ["", "| model | NLL ratio | KL | top-1 |", "| --- | ---: | ---: | ---: |"]
    rows = dict(summ.get("baselines", {}))
    for stage, st in summ.get("stages", {}).items():
        if st.get("after"):
            rows[f"student after {stage}"] = st["after"]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {_fmt(m.get('nll_ratio'), '.4f')} | {_fmt(m.get('kl'), '.4f')} | "
            f"{_fmt(m.get('top1'))} |"
        )
    lines += ["", "| stage | tokens | tok/s | wall s |", "| --- | ---: | ---: | ---: |"]
    for stage, st in summ.get("stages", {}).items():
        lines.append(
            f"| {stage} | {_fmt(st.get('tokens'), ',')} | {_fmt(st.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(st.get('wall_s'), '.0f')} |"
        )
    return [*lines, "", "Goals (issue 12): NLL ratio <= 1.10, >= 20M training tokens.", ""]


def _eval(s: dict) -> list[str]:
    e = (s.get("eval") or {}).get("results")
    lines = ["## Evaluation", ""]
    if not e:
        return [*lines, "not run", ""]
    tasks = sorted({t for per in e.values() for t in per})
    lines += ["| model | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for model, per in e.items():
        cells = []
        for t in tasks:
            metrics = per.get(t, {})
            key = "perplexity" if "perplexity" in metrics else next(iter(metrics), None)
            cells.append(f"{metrics[key]['value']:.4g} ({key})" if key else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "Goal: student WikiText-2 ppl at 2048 below SWA(64)+4's (39.7).", ""]
    lc = (s.get("eval") or {}).get("long_context") or {}
    if lc:
        lengths = sorted({p["target_length"] for m in lc.values() for p in m.get("passkey", [])})
        lines += [
            "Passkey retrieval (correct / tried):",
            "",
            "| model | " + " | ".join(map(str, lengths)) + " |",
        ]
        lines.append("| --- |" + " ---: |" * len(lengths))
        for model, m in lc.items():
            tries = m.get("passkey", [])
            cells = []
            for n in lengths:
                at = [p for p in tries if p["target_length"] == n]
                cells.append(f"{sum(p['correct'] for p in at)}/{len(at)}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render(s: dict) -> str:
    head = [
        f"# GPU path: {s.get('part')}"
        + (" (dry run on CPU: toy sizes, CUDA steps skipped)" if s.get("dry_run") else ""),
        "",
        f"wall {s.get('wall_s')} s. Files: summary.json (everything below, machine-readable), log.txt.",
        "",
    ]
    parts = [head, _env(s), _steps(s), _warmup(s), _parity(s), _throughput(s), _convert(s), _eval(s)]
    return "\n".join(line for part in parts for line in part)


def plot(s: dict, path: Path) -> None:
    """Compile seconds per kernel and tokens/s per stage, side by side (empty panels say 'not run')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    kernels = sorted(((s.get("warmup") or {}).get("kernels") or {}).values(), key=lambda k: k["compile_s"])
    if kernels:
        a.barh([k["kernel"] for k in kernels], [k["compile_s"] for k in kernels])
        a.tick_params(axis="y", labelsize=6)
    else:
        a.text(0.5, 0.5, "warm-up not run", ha="center", va="center", transform=a.transAxes)
    a.set_xlabel("compile s (warm-up)")
    stages = ((s.get("throughput") or {}).get("stages")) or {}
    if stages:
        b.bar(list(stages), [r["tok_per_s"] for r in stages.values()])
        b.axhline(DISTILL_TARGET, color="gray", ls="--", lw=1, label="distill target")
        b.legend(fontsize=7)
        b.set_yscale("log")
    else:
        b.text(0.5, 0.5, "throughput not run", ha="center", va="center", transform=b.transAxes)
    b.set_ylabel("tokens/s")
    fig.suptitle(f"GPU path {s.get('part')}{' (dry run)' if s.get('dry_run') else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
