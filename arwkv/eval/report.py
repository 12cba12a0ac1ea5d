"""Markdown + JSON report of an eval run: each score ± stderr, and retention vs the reference (teacher)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from arwkv.eval.stats import retention

# Metrics shown as percentages (fractions in the JSON, as lm-eval stores them).
_PERCENT = {"acc", "acc_norm", "top1_agreement", "top1_agreement_confident", "confident_fraction"}


def _fmt(metric: str, value: float, stderr: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    scale = 100.0 if metric in _PERCENT else 1.0
    digits = 1 if metric in _PERCENT else (2 if value * scale >= 1 else 4)
    text = f"{value * scale:.{digits}f}"
    if stderr is not None and not math.isnan(stderr):
        text += f" ± {stderr * scale:.{digits}f}"
    return text


def _pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


def rows(result: dict) -> list[tuple[str, str, dict[str, dict]]]:
    """(task, metric, {model: score dict}) in task order, metrics in first-seen order."""
    out: list[tuple[str, str, dict[str, dict]]] = []
    models = list(result["results"])
    seen: list[tuple[str, str]] = []
    for m in models:
        for task, metrics in result["results"][m].items():
            for metric in metrics:
                if (task, metric) not in seen:
                    seen.append((task, metric))
    for task, metric in seen:
        out.append((task, metric, {m: result["results"][m].get(task, {}).get(metric) for m in models}))
    return out


def retention_table(result: dict) -> dict[str, dict[str, float]]:
    """{model: {"task/metric": retention %}} for every model other than the reference."""
    ref = result["reference"]
    table: dict[str, dict[str, float]] = {}
    for task, metric, scores in rows(result):
        r = scores.get(ref)
        for model, s in scores.items():
            if model == ref or s is None or r is None:
                continue
            table.setdefault(model, {})[f"{task}/{metric}"] = retention(
                s["value"], r["value"], s.get("higher_is_better", True)
            )
    return table


def markdown(result: dict) -> str:
    models = list(result["results"])
    ref = result["reference"]
    others = [m for m in models if m != ref]
    head = ["task", "metric", *models, *[f"{m} / {ref} (%)" for m in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ret = retention_table(result)
    for task, metric, scores in rows(result):
        cells = [
            task,
            metric
            + (" ↓" if any(s and not s.get("higher_is_better", True) for s in scores.values()) else ""),
        ]
        cells += [_fmt(metric, s["value"], s.get("stderr")) if s else "–" for s in scores.values()]
        cells += [_pct(ret.get(m, {}).get(f"{task}/{metric}")) for m in others]
        lines.append("| " + " | ".join(cells) + " |")
    cfg = result.get("config", {})
    notes = [
        "",
        f"Accuracies in %, ± one standard error (binomial, n-1); perplexity ± bootstrap stderr. ↓ = lower is "
        f"better; retention = model / {ref} (inverted for ↓ metrics, so 100% = as good as {ref}).",
        f"limit={cfg.get('limit')}, batch_size={cfg.get('batch_size')}, data: {cfg.get('data_dir')}.",
    ]
    for key, label in (("seconds", "Wall seconds"), ("cpu_seconds", "CPU seconds")):
        secs = result.get(key, {})
        if any(secs.values()):
            per_model = (f"{m}: " + ", ".join(f"{t} {s:.0f}" for t, s in v.items()) for m, v in secs.items())
            notes.append(f"{label}: " + "; ".join(per_model))
    return "\n".join(lines + notes) + "\n"


def write(result: dict, out_dir: str | Path, stem: str = "eval") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    full = {**result, "retention": retention_table(result)}
    js.write_text(json.dumps(full, indent=2, default=float))
    md.write_text(markdown(result))
    return md, js
