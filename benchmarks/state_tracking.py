"""State-tracking experiment (issue 5 item 3): Transformer vs RWKV-7 vs a distilled student on group words.

For each group: (1) a tiny Llama Transformer trained from scratch, (2) an RWKV-7 LM of the same parameter
count trained from scratch (the project's student, all layers RWKV-7, ``build_student(init="fresh")``), (3) an
RWKV-7 student converted from the trained Transformer (``build_student(init="copy")``) and distilled on its
logits.
All are trained at one length and evaluated at that length and longer ones.

    python benchmarks/state_tracking.py                     # full run, resumable (rerun the same command)
    python benchmarks/state_tracking.py --groups S3 --steps 300 --out /tmp/st   # smoke run

Writes ``<out>/results.json``, ``<out>/table.md``, ``<out>/accuracy_vs_length.png``; one run folder per
model in ``<out>/ckpt`` (the project's training loop: safetensors checkpoints, metrics.jsonl). A phase
already in results.json is skipped; an interrupted phase resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from arwkv.experiments import state_tracking as st

PHASES = ("transformer", "rwkv7", "distilled")
# RWKV-7's size-based LoRA ranks have a floor of 32, which at d_model 64 makes each LoRA as large as an
# attention projection; ranks like those of BlinkDL's small demos keep the model close to attention's size.
MIXER_OPTIONS = {"lora_ranks": {"w": 16, "a": 16, "v": 8, "g": 16}, "wkv_backend": "chunked"}
LABELS = {
    "transformer": "Transformer (Llama)",
    "rwkv7": "RWKV-7 (from scratch)",
    "distilled": "RWKV-7 distilled from the Transformer",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="S3,Z2,A5", help="comma-separated: S<n>, A<n>, Z<n>")
    p.add_argument("--train-length", type=int, default=16)
    p.add_argument("--eval-lengths", default="4,8,16,32,64,128")
    p.add_argument(
        "--steps",
        default="S3=2000,A5=1000,Z2=1000",
        help="training steps of each model (Transformer, RWKV-7, distillation): N, or GROUP=N,... per group",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--eval-sequences", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--out", default="results/state_tracking")
    p.add_argument("--report-only", action="store_true", help="only rewrite table.md and the plot")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def steps_for(spec: str, group: str) -> int:
    """``"1500"`` or ``"S3=2000,A5=1000"`` -> the step count for ``group``."""
    if "=" not in spec:
        return int(spec)
    table = dict(item.split("=") for item in spec.split(","))
    if group not in table:
        raise SystemExit(f"--steps {spec!r} has no entry for group {group}")
    return int(table[group])


def _trained(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    """`model` with the weights of the newest checkpoint of a finished run folder (the loop's task keeps the
    model as `student.`)."""
    from arwkv.train import checkpoint as ckpt

    latest = ckpt.latest_intact_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise SystemExit(f"{run_dir} has no checkpoint: run its phase first")
    model.load_state_dict({k.removeprefix("student."): v for k, v in ckpt.load_model_state(latest).items()})
    return model


def run_phase(args, group: st.PermutationGroup, phase: str, out: Path, results: dict) -> dict:
    """Train (or distil) one model in its run folder (the project's training loop: resumable, safetensors
    checkpoints), then evaluate it at every length. CPU seconds count the sitting that finished the phase."""
    run_dir = out / "ckpt" / f"{group.name}-{phase}"
    steps = steps_for(args.steps, group.name)
    cfg = st.TrainConfig(
        steps=steps, batch_size=args.batch_size, length=args.train_length, lr=args.lr, seed=args.seed
    )
    kw = dict(hidden_size=args.hidden_size, num_layers=args.layers, head_dim=args.head_dim)
    torch.manual_seed(args.seed)
    # the Transformer is the reference size; the from-scratch RWKV-7 is matched to it
    transformer = st.make_transformer(st.transformer_config(group, **kw))
    if phase == "transformer":
        model, teacher = transformer, None
    elif phase == "rwkv7":
        model, _ = st.make_matched_rwkv7(group, st.num_params(transformer), MIXER_OPTIONS, **kw)
        teacher = None
    else:
        teacher = _trained(transformer, out / "ckpt" / f"{group.name}-transformer")
        from arwkv.convert.build import build_student

        model = build_student(teacher, init="copy", **MIXER_OPTIONS)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def on_log(rec: dict) -> None:
        msg = f"step {rec['step']}/{steps} loss {rec['loss']:.4f} acc {rec['token_acc']:.3f}"
        log(f"{group.name}/{phase} {msg}")

    if teacher is None:
        history = st.train(model, group, cfg, run_dir, on_log=on_log)
    else:
        history = st.distill(model, teacher, group, cfg, run_dir, on_log=on_log)
    train_cpu = time.process_time() - cpu0
    lengths = [int(x) for x in args.eval_lengths.split(",")]
    t_eval = time.process_time()
    ev = st.evaluate(model, group, lengths, num_sequences=args.eval_sequences)
    keep = ("step", "loss", "token_acc", "lr/matrices", "wall_s")
    rec = {
        "params": st.num_params(model),
        "steps": steps,
        "train_cpu_sec": round(train_cpu, 1),
        "eval_cpu_sec": round(time.process_time() - t_eval, 1),
        "wall_sec": round(time.perf_counter() - wall0, 1),
        "final_train_loss": history[-1]["loss"],
        "history": [{k: h[k] for k in keep if k in h} for h in history],
        "eval": {str(k): v for k, v in ev.items()},
    }
    if phase == "distilled":
        rec["teacher_params"] = st.num_params(teacher)
    log(f"{group.name}/{phase}: " + ", ".join(f"T={k} tok {v['token_acc']:.3f}" for k, v in ev.items()))
    return rec


def add_agreement(args, group: st.PermutationGroup, out: Path, rec: dict) -> None:
    """Top-1 agreement of the distilled student with its teacher at every length (from the checkpoints)."""
    from arwkv.convert.build import build_student

    kw = dict(hidden_size=args.hidden_size, num_layers=args.layers, head_dim=args.head_dim)
    teacher = _trained(
        st.make_transformer(st.transformer_config(group, **kw)), out / "ckpt" / f"{group.name}-transformer"
    )
    student = _trained(
        build_student(teacher, init="copy", **MIXER_OPTIONS), out / "ckpt" / f"{group.name}-distilled"
    )
    lengths = [int(x) for x in args.eval_lengths.split(",")]
    cmp = st.compare_to_teacher(student, teacher, group, lengths, num_sequences=args.eval_sequences)
    rec["vs_teacher"] = {str(k): v for k, v in cmp.items()}
    log(f"{group.name}/distilled agreement: " + ", ".join(f"T={k} {v['agree']:.3f}" for k, v in cmp.items()))


def write_table(results: dict, path: Path) -> None:
    cfg = results["config"]
    lengths = cfg["eval_lengths"]
    lines = [
        "# State tracking: group word problem (running product at every position)",
        "",
        f"Trained at length {cfg['train_length']} (lengths > {cfg['train_length']} are extrapolation); "
        f"d_model {cfg['hidden_size']}, {cfg['layers']} layers, head size {cfg['head_dim']}, batch "
        f"{cfg['batch_size']}, AdamW lr {cfg['lr']} cosine; steps per model (same for distillation): "
        f"{cfg['steps']}; CPU, {cfg['threads']} thread(s); "
        f"{cfg['eval_sequences']} fresh words per length. Chance = 1/|G|.",
        "",
    ]
    for metric, title in (
        ("token_acc", "Per-token accuracy (fraction of positions whose running product is right)"),
        ("last_acc", "Final-product accuracy (right at the last position)"),
        ("seq_acc", "Whole-sequence accuracy (right at every position)"),
    ):
        lines += [f"## {title}", ""]
        lines.append(
            "| group | model | params | train CPU min | " + " | ".join(f"T={t}" for t in lengths) + " |"
        )
        lines.append("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in lengths) + " |")
        for gname, phases in results["groups"].items():
            for phase in PHASES:
                if phase not in phases:
                    continue
                r = phases[phase]
                cells = []
                for t in lengths:
                    v = r["eval"][str(t)][metric]
                    cell = f"{v:.3f}"
                    cells.append(f"**{cell}**" if t == cfg["train_length"] else cell)
                lines.append(
                    f"| {gname} | {LABELS[phase]} | {r['params']:,} | {r['train_cpu_sec'] / 60:.1f} | "
                    + " | ".join(cells)
                    + " |"
                )
        lines.append("")
    lines += _teacher_table(results, lengths)
    lines.append(
        f"Bold: the training length. Machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}."
    )
    path.write_text("\n".join(lines) + "\n")


def _teacher_table(results: dict, lengths: list[int]) -> list[str]:
    rows = {
        g: p["distilled"]["vs_teacher"]
        for g, p in results["groups"].items()
        if "vs_teacher" in p.get("distilled", {})
    }
    if not rows:
        return []
    lines = [
        "## Distilled student vs its teacher (inherits or exceeds?)",
        "",
        "Per cell: top-1 agreement over all positions / over the positions the teacher gets wrong, the "
        "student copies the teacher's answer / the student is right.",
        "",
        "| group | " + " | ".join(f"T={t}" for t in lengths) + " |",
        "| --- | " + " | ".join("---:" for _ in lengths) + " |",
    ]
    for gname, cmp in rows.items():
        cells = []
        for t in lengths:
            c = cmp[str(t)]
            copied, right = c["agree_when_teacher_wrong"], c["right_when_teacher_wrong"]
            tail = "– / –" if c["teacher_wrong"] == 0 else f"{copied:.2f} / {right:.2f}"
            cells.append(f"{c['agree']:.2f} / {tail}")
        lines.append(f"| {gname} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    groups = list(results["groups"])
    fig, axes = plt.subplots(2, len(groups), figsize=(4.6 * len(groups), 7), squeeze=False)
    colors = {"transformer": "tab:blue", "rwkv7": "tab:red", "distilled": "tab:green"}
    for col, gname in enumerate(groups):
        order = st.get_group(gname).order
        for row, (metric, ylabel) in enumerate(
            (("token_acc", "per-token accuracy"), ("last_acc", "final-product accuracy"))
        ):
            ax = axes[row][col]
            for phase, r in results["groups"][gname].items():
                xs = sorted(int(t) for t in r["eval"])
                ys = [r["eval"][str(t)][metric] for t in xs]
                ax.plot(xs, ys, "o-", color=colors[phase], label=LABELS[phase])
            ax.axvline(cfg["train_length"], color="gray", ls=":", lw=1)
            ax.axhline(1 / order, color="gray", ls="--", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{gname} (|G|={order})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Group word problem: trained at length {cfg['train_length']} (dotted), chance dashed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    config = {k: v for k, v in vars(args).items() if k not in ("out", "report_only")}
    config["eval_lengths"] = [int(x) for x in args.eval_lengths.split(",")]
    config["mixer_options"] = MIXER_OPTIONS
    results = json.loads(res_path.read_text()) if res_path.exists() else {"groups": {}}
    results["config"] = config
    if not args.report_only:
        for gname in args.groups.split(","):
            group = st.get_group(gname)
            done = results["groups"].setdefault(group.name, {})
            for phase in PHASES:
                if phase in done:
                    log(f"{group.name}/{phase}: done, skipping")
                    continue
                done[phase] = run_phase(args, group, phase, out, results)
                res_path.write_text(json.dumps(results, indent=1))
            if "distilled" in done and "vs_teacher" not in done["distilled"]:
                add_agreement(args, group, out, done["distilled"])
                res_path.write_text(json.dumps(results, indent=1))
    write_table(results, out / "table.md")
    plot(results, out / "accuracy_vs_length.png")
    log(f"wrote {res_path}, {out / 'table.md'}, {out / 'accuracy_vs_length.png'}")


if __name__ == "__main__":
    main()
