"""`report.md` of a conversion run: held-out metrics of teacher, baselines and the student before/after every
stage, per-stage throughput, and PNG curves (training loss per stage; held-out NLL ratio and KL against
training minutes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRIC_COLUMNS = [
    ("nll", "NLL"),
    ("nll_ratio", "NLL ratio"),
    ("kl", "KL"),
    ("top1", "top-1"),
    ("top1_confident", "top-1 (p_T ≥ 0.5)"),
]


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _row(name: str, m: dict[str, float] | None) -> str:
    if not m:
        return f"| {name} |" + " |" * len(METRIC_COLUMNS)
    cells = [_fmt(m.get(k, float("nan"))) if k in m else "–" for k, _ in METRIC_COLUMNS]
    return f"| {name} | " + " | ".join(cells) + " |"


def eval_curve(run_dir: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Held-out points (cumulative training minutes and tokens, stage, metrics): stage boundaries plus
    periodic evals."""
    points = []
    init = summary.get("baselines", {}).get("student_init")
    if init:
        points.append({**init, "minutes": 0.0, "train_tokens": 0, "stage": "init"})
    tokens_before = 0
    for name, st in summary.get("stages", {}).items():
        base = st.get("minutes_before", 0.0)
        for r in _records(run_dir / name / "metrics.jsonl"):
            if "eval/kl" in r:
                points.append(
                    {
                        **{k[5:]: v for k, v in r.items() if k.startswith("eval/")},
                        "minutes": base + r["wall_s"] / 60,
                        "train_tokens": tokens_before + r.get("tokens", 0),
                        "stage": name,
                    }
                )
        if st.get("done"):
            tokens_before += st.get("tokens", 0)
            points.append(
                {
                    **st["after"],
                    "minutes": base + st["wall_s"] / 60,
                    "train_tokens": tokens_before,
                    "stage": name,
                }
            )
    return points


def _plots(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    stages = [s for s in summary.get("stages", {}) if _records(run_dir / s / "metrics.jsonl")]
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.2), squeeze=False)
        for ax, name in zip(axes[0], stages, strict=True):
            recs = [r for r in _records(run_dir / name / "metrics.jsonl") if "loss" in r]
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
            ax.set_title(f"{name}: {summary['stages'][name].get('loss', '')} loss")
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "loss_curves.png", dpi=110)
        plt.close(fig)
        files.append("loss_curves.png")
    pts = [p for p in eval_curve(run_dir, summary) if "kl" in p]
    if pts:
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
        for row, (key, label, teacher_value) in enumerate(
            (("nll_ratio", "NLL ratio to teacher", 1.0), ("kl", "KL(teacher ‖ student)", 0.0))
        ):
            for ax, x, xlabel in (
                (axes[row][0], "minutes", "training minutes"),
                (axes[row][1], "train_tokens", "training tokens"),
            ):
                ax.plot([p.get(x, 0) for p in pts], [p[key] for p in pts], "o-", label="student")
                ax.axhline(teacher_value, color="black", lw=0.8, label="teacher")
                swa = summary.get("baselines", {}).get("swa")
                if swa and key in swa:
                    ax.axhline(
                        swa[key],
                        color="gray",
                        ls="--",
                        label=f"teacher SWA({swa.get('window')})+{swa.get('sinks')} sinks",
                    )
                ax.set_xlabel(xlabel)
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "heldout_curve.png", dpi=110)
        plt.close(fig)
        files.append("heldout_curve.png")
    return files


def _data_line(cfg: dict[str, Any]) -> str:
    files = cfg.get("data", {}).get("train") or []
    return f"files {', '.join(files)}" if files else "data-free (the teacher wrote it)"


def write_report(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    cfg, models, base = summary.get("config", {}), summary.get("models", {}), summary.get("baselines", {})
    held = summary.get("heldout", {})
    lines = [f"# arwkv conversion: {cfg.get('name', run_dir.name)}", ""]
    lines += [
        f"- teacher: `{models.get('teacher')}` ({_fmt(models.get('teacher_params', 0))} parameters)",
        f"- student: RWKV-7 mixers, init `{models.get('init')}`, {_fmt(models.get('student_params', 0))} "
        f"parameters; lm_head {'untied' if models.get('untied_lm_head') else 'tied'} from the embeddings; "
        f"mixer options {cfg.get('student', {}).get('mixer') or 'default'}",
        f"- data: {_data_line(cfg)}; sampling/preparation {summary.get('sampling_s', 0) / 60:.1f} min",
    ]
    sel = summary.get("layer_selection")
    if sel:  # student.softmax_layers: auto:K
        lines.append(
            f"- softmax layers chosen by measurement (auto:{sel['k']}): {sel['selected']} (evenly spaced "
            f"would be {sel['evenly_spaced']}; ranking {sel['ranking']}, cost "
            f"{sel['cost']['total_s']:.0f} s; [select_layers/ranking.md](select_layers/ranking.md))"
        )
    lines += [
        f"- total wall time {summary.get('total_wall_s', 0) / 60:.1f} min (all phases, across resumes)",
        "",
        f"## Held-out metrics ({held.get('sequences')} sequences × {held.get('seq_len')} tokens)",
        "",
        "NLL: nats per predicted token; ratio: student / teacher NLL; KL: forward KL(p_T ‖ p_S) per token.",
        "",
        "| model | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |",
        "|---" * (len(METRIC_COLUMNS) + 1) + "|",
        _row("teacher", base.get("teacher")),
    ]
    if base.get("swa"):
        lines.append(
            _row(
                f"teacher, window {base['swa'].get('window')} + {base['swa'].get('sinks')} sinks (no "
                "training)",
                base["swa"],
            )
        )
    lines.append(_row("student, untrained", base.get("student_init")))
    for name, st in summary.get("stages", {}).items():
        lines.append(_row(f"student after {name}", st.get("after")))
    lines += [
        "",
        "## Stages",
        "",
        "| stage | loss | steps | tokens | training min | tokens/s | final loss | lr (mixers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, st in summary.get("stages", {}).items():
        if not st.get("done"):
            lines.append(f"| {name} | (not finished) |||||||")
            continue
        lr = f"{st['lr']:g}" + (f" ({st['mixer_lr']:g})" if st.get("mixer_lr") else "")
        lines.append(
            f"| {name} | {st.get('loss')} | {st['steps']} | {st['tokens']:,} | {st['wall_s'] / 60:.2f} | "
            f"{st['tokens_per_s']:,.0f} | {st['final_loss']:.4g} | {lr} |"
        )
    pts = [p for p in eval_curve(run_dir, summary) if "kl" in p]
    if pts:
        lines += [
            "",
            "## Held-out curve",
            "",
            "| training min | tokens | stage | NLL ratio | KL |",
            "|---|---:|---|---|---|",
        ]
        lines += [
            f"| {p['minutes']:.2f} | {p.get('train_tokens', 0):,} | {p['stage']} | {p['nll_ratio']:.4f} | "
            f"{p['kl']:.4f} |"
            for p in pts
        ]
    from arwkv.recipes.dpo import report_lines

    lines += report_lines(run_dir, summary)
    for f in _plots(run_dir, summary):
        lines += ["", f"![{f}]({f})"]
    lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
