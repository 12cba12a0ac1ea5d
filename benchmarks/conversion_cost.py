"""What stage 1 and stage 2 cost per token on the real SmolLM2-135M-Instruct teacher, today's path vs each
speed-up, through the same `train()` loop and stage tasks that `arwkv convert` runs.

    python benchmarks/conversion_cost.py [--steps 6] [--warmup 2] [--quality-tokens 0] [--json F] [--md F]

Variants (each on a freshly built copy-init student, same rows, same seed):
- stage 1 `fp32-chunked` (the path when issue 11 was filed: fp32, the PyTorch chunked WKV kernel), `fp32` (the
  default WKV kernel: native C++ on CPU) and `bf16` (autocast; fp32 master weights and WKV state);
- stage 2 `fp32-chunked` (as filed: online full-vocabulary teacher, everything trains, chunked kernel), `fp32`
  (default kernel), `bf16`, `freeze` (only the mixers and norms train), `cache` (teacher top-k from a
  `TeacherCache` that was filled beforehand; the teacher does not run), `all` (bf16 + freeze + cache) and
  `fast` (freeze + cache at the precision `bf16=auto` picks here: bf16 only where the CPU multiplies
  bf16 natively; on a CPU without AVX512-BF16/AMX, emulated bf16 is several times slower than fp32).
"× today" is relative to `fp32-chunked` when it ran, else to `fp32`.

Process layout: launched as `torchrun --standalone --nproc-per-node=N benchmarks/conversion_cost.py --threads
1 …`, every variant trains as N DDP processes (gradients all-reduced over gloo, as `arwkv convert processes=N`
does) and the rates are the whole machine's (N × batch × seq_len per step); rank 0 writes the results.

Rows: tinyshakespeare from ../shared/assets packed to --seq-len, batch --batch. Timing: wall time per
optimizer step after --warmup steps, on --threads torch threads; run it with nothing else on the machine.
With --quality-tokens N each stage-2 variant also trains N tokens from the copy-init student and reports the
held-out KL (full vocabulary) on held-out rows, so speed and quality per token are judged side by side.
Also printed: the top-k KL vs the full-vocabulary KL on one batch (relative error), cache bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--quality-tokens", type=int, default=0)
    ap.add_argument("--variants", default="fp32-chunked,fp32,bf16,freeze,cache,all")
    ap.add_argument("--student", default="", help="a trained student folder for the top-k fidelity check")
    ap.add_argument("--json", default="")
    ap.add_argument("--md", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from arwkv.ops.precision import cpu_features, resolve_bf16
    from arwkv.train.distributed import init_distributed

    env = init_distributed("cpu")
    world = env.world_size
    fast_bf16, _ = resolve_bf16("auto", env.device)

    def say(obj) -> None:
        if env.is_main:
            print(obj, flush=True)

    from arwkv.config import StageConfig
    from arwkv.convert.build import build_student
    from arwkv.data.packing import PackedLoader, build_corpus
    from arwkv.data.teacher_cache import TeacherCache, bytes_per_token
    from arwkv.loading import load_model
    from arwkv.ops.divergence import kl_per_token, teacher_topk, topk_kl_per_token
    from arwkv.recipes.align import AlignTask
    from arwkv.recipes.distill import DistillTask
    from arwkv.train.forward import hidden_states
    from arwkv.train.loop import train
    from arwkv.train.params import param_groups

    teacher, tok = load_model("smollm2-135m-instruct")
    teacher.eval().requires_grad_(False)
    corpus = build_corpus(ASSETS / "tinyshakespeare" / "input.txt", tok, args.seq_len, progress=False)
    train_rows, held_rows = corpus.split(8, seed=1)
    held = held_rows.tensors()
    n_steps = args.warmup + args.steps
    # one folder for all ranks (DDP checkpoints are written by every rank into the same run folder)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getpid())
    tmp = Path(tempfile.gettempdir()) / f"arwkv-cost-{run_id}"
    tmp.mkdir(parents=True, exist_ok=True)

    def student_from(t, backend: str | None = None):
        torch.manual_seed(0)
        student = build_student(t, init="copy", untie_embeddings=True).float().train()
        if backend is not None:  # the mixers read their kernel choice at every forward
            student.config.wkv_backend = backend
            for m in student.modules():
                if hasattr(m, "backend"):
                    m.backend = backend
        return student

    def run(task, groups, stage_cfg, bf16, name, loader):
        times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step, rec):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        train(
            task,
            loader,
            stage_cfg,
            tmp / name,
            param_groups=groups,
            bf16=bf16,
            resume=False,
            desc=name,
            on_step=on_step,
            env=env,
        )
        per_step = float(np.mean(times[args.warmup :]))
        return world * args.batch * args.seq_len / per_step

    def stage_cfg(steps, **kw):
        return StageConfig(
            tokens=steps * args.batch * args.seq_len,
            seq_len=args.seq_len,
            batch_size=args.batch,
            warmup_steps=1,
            ckpt_interval=10**9,
            log_interval=10**9,
            keep_checkpoints=1,
            **kw,
        )

    rows_out: list[dict] = []
    variants = args.variants.split(",")

    # ---------------------------------------------------------------- the teacher's forward alone
    for bf16 in (False, True):
        loader = PackedLoader(train_rows, args.batch, seed=0)
        times = []
        for i in range(n_steps):
            b = next(loader)
            t0 = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hs, head = hidden_states(teacher, b)
                head(hs)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        tps = world * args.batch * args.seq_len / float(np.mean(times))
        rows_out.append(
            {"stage": "teacher forward", "variant": "bf16" if bf16 else "fp32", "tokens_per_s": tps}
        )
        say(rows_out[-1])

    # ---------------------------------------------------------------- stage 1
    align_variants = [(False, "chunked", "fp32-chunked"), (False, None, "fp32"), (True, None, "bf16")]
    for bf16, backend, label in align_variants:
        if label not in variants and label != "fp32":
            continue
        student = student_from(teacher, backend)
        groups = param_groups(student, 1e-3, only=["mixers"])
        loader = PackedLoader(train_rows, args.batch, seed=0)
        tps = run(
            AlignTask(student, teacher),
            groups,
            stage_cfg(n_steps, loss="mse", lr=1e-3),
            bf16,
            f"align-{label}",
            loader,
        )
        rows_out.append({"stage": "align", "variant": label, "tokens_per_s": tps})
        say(rows_out[-1])
        del student

    # ---------------------------------------------------------------- stage 2
    cache_dirs: dict[bool, TeacherCache] = {}

    def cache_for(bf16: bool) -> TeacherCache:
        if bf16 not in cache_dirs:
            c = TeacherCache.open(
                tmp / f"cache-{bf16}-rank{env.rank}",
                {"bench": True, "bf16": bf16},
                num_rows=train_rows.num_base_rows,
                seq_len=args.seq_len,
                k=args.topk,
            )
            # fill the rows the timed steps will read, so the timing has no teacher in it
            fill = PackedLoader(train_rows, args.batch, seed=0, with_row_ids=True)
            task = DistillTask(student_from(teacher), teacher, cache=c)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for _ in range(n_steps):
                    task._teacher_fn(next(fill), teacher.config.vocab_size)
            cache_dirs[bf16] = c
        return cache_dirs[bf16]

    specs = {
        "fp32-chunked": dict(bf16=False, freeze=[], cache=False, backend="chunked"),
        "fp32": dict(bf16=False, freeze=[], cache=False),
        "bf16": dict(bf16=True, freeze=[], cache=False),
        "freeze": dict(bf16=False, freeze=["embeddings", "mlp", "lm_head"], cache=False),
        "cache": dict(bf16=False, freeze=[], cache=True),
        "all": dict(bf16=True, freeze=["embeddings", "mlp", "lm_head"], cache=True),
        "fast": dict(bf16=fast_bf16, freeze=["embeddings", "mlp", "lm_head"], cache=True),
    }
    for name in variants:
        spec = specs[name]
        student = student_from(teacher, spec.get("backend"))
        groups = param_groups(student, 1e-4, 1e-3, freeze=spec["freeze"])
        cache = cache_for(spec["bf16"]) if spec["cache"] else None
        loader = PackedLoader(train_rows, args.batch, seed=0, with_row_ids=cache is not None)
        task = DistillTask(student, teacher, cache=cache)
        tps = run(
            task, groups, stage_cfg(n_steps, loss="kl", lr=1e-4), spec["bf16"], f"distill-{name}", loader
        )
        rec = {"stage": "distill", "variant": name, "tokens_per_s": tps}
        if args.quality_tokens > 0:
            steps = max(1, args.quality_tokens // (args.batch * args.seq_len))
            q_student = student_from(teacher, spec.get("backend"))
            groups = param_groups(q_student, 1e-4, 1e-3, freeze=spec["freeze"])
            q_loader = PackedLoader(train_rows, args.batch, seed=0, with_row_ids=cache is not None)
            q_task = DistillTask(q_student, teacher, cache=cache)
            train(
                q_task,
                q_loader,
                stage_cfg(steps, loss="kl", lr=1e-4, mixer_lr=1e-3),
                spec["bf16"],
                tmp / f"q-{name}",
                param_groups=groups,
                resume=False,
                desc=f"quality {name}",
            )
            with torch.no_grad():
                zs = hidden_states(q_student, held)
                zt = hidden_states(teacher, held)
                kl = kl_per_token(zs[1](zs[0]), zt[1](zt[0])).mean().item()
            rec["heldout_kl"] = kl
            rec["quality_tokens"] = steps * args.batch * args.seq_len
        rows_out.append(rec)
        say(rec)
        del student, task

    # ---------------------------------------------------------------- top-k fidelity
    b = PackedLoader(held_rows, 8, seed=0).__next__()
    with torch.no_grad():
        if args.student:
            student, _ = load_model(args.student)
        else:
            student = student_from(teacher)
        hs, head_s = hidden_states(student, b)
        ht, head_t = hidden_states(teacher, b)
        zs, zt = head_s(hs).flatten(0, 1), head_t(ht).flatten(0, 1)
        full = kl_per_token(zs, zt).mean().item()
        fidelity = {}
        for k in (16, 32, 64, 128):
            approx = topk_kl_per_token(zs, teacher_topk(zt, k)).mean().item()
            fidelity[k] = {"topk_kl": approx, "full_kl": full, "rel_error": (full - approx) / full}

    base = {r["stage"]: r["tokens_per_s"] for r in rows_out if r["variant"] == "fp32"}
    base.update({r["stage"]: r["tokens_per_s"] for r in rows_out if r["variant"] == "fp32-chunked"})
    for r in rows_out:
        r["speedup"] = r["tokens_per_s"] / base[r["stage"]]
    out = {
        "machine": platform.processor() or platform.machine(),
        "cpu_capability": cpu_features(),
        "bf16_auto": "bf16" if fast_bf16 else "fp32",
        "processes": world,
        "threads": args.threads,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "topk": args.topk,
        "cache_mb_per_million_tokens": bytes_per_token(args.topk),
        "rows": rows_out,
        "topk_fidelity": fidelity,
        "topk_fidelity_student": "trained (--student)" if args.student else "copy-init, untrained",
    }
    teacher_fp32 = base["teacher forward"]
    lines = [
        "| stage | variant | tokens/s | × today (fp32, chunked kernel) | cost in fp32 teacher forwards | "
        "held-out KL |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows_out:
        kl = f"{r['heldout_kl']:.3f}" if "heldout_kl" in r else "—"
        lines.append(
            f"| {r['stage']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | "
            f"{teacher_fp32 / r['tokens_per_s']:.2f} | {kl} |"
        )
    lines += ["", "| k | top-k KL | full KL | relative error |", "|---:|---:|---:|---:|"]
    for k, f in fidelity.items():
        lines.append(f"| {k} | {f['topk_kl']:.4f} | {f['full_kl']:.4f} | {100 * f['rel_error']:.2f}% |")
    table = "\n".join(lines)
    if not env.is_main:
        return
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.md:
        Path(args.md).write_text(table + "\n")


if __name__ == "__main__":
    main()
