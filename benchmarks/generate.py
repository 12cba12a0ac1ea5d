"""Prefill and decode speed and memory: an RWKV-7 student vs its teacher with a KV cache (CPU).

Both models share every non-attention weight: the teacher is a random Llama-like model (SmolLM2-135M shape
by default: hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, 30 layers); the student is
`build_student(teacher, init="copy")`. For each context length L a fresh subprocess builds one model,
prefills L random tokens in chunks (logits of the last token only), then times greedy decoding.

Reported per (model, L, batch B; B sequences of L tokens each):
- prefill tokens per CPU-second (B·L tokens in chunks of --prefill-chunk);
- decode tokens per CPU-second (B per step), one torch thread (other jobs on a shared machine do not distort
  it); wall-clock tokens/s alongside; the student/teacher ratios of both, measured in the same run;
- `state MiB`: exact bytes of the per-sequence cache (KV cache for the teacher; token shift + fp32 WKV
  state for the student);
- `decode MiB`: the state plus the peak extra memory decoding allocates (peak RSS while decoding minus the
  RSS when decoding starts, from /proc: VmHWM reset through /proc/self/clear_refs after the prefill);
- `peak RSS MiB`: the process's peak RSS while decoding (weights included).

    python benchmarks/generate.py                       # 30 layers, contexts 1k 4k 16k, batch 1
    python benchmarks/generate.py --layers 6 --contexts 1024 32768 --batches 1 8 --json out.json
    python benchmarks/generate.py --contexts 1024 --models student --profile   # per-op decode profile

The 30-layer teacher needs many CPU-minutes to prefill 16k tokens; `--layers` shrinks both models alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "shift", "wkv"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def build_models(args: argparse.Namespace, which: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.contexts) + args.decode + 16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).eval()
    if which == "teacher":
        return teacher
    from arwkv.convert import build_student

    student = build_student(teacher, init="copy").eval()
    del teacher
    gc.collect()
    return student


def _profile_decode(model, cache, token, steps: int = 4, top: int = 15) -> list[dict]:
    """Where a decode step spends its CPU time: the `top` ops by self time, per step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [
        {
            "op": e.key,
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls_per_step": e.count // steps,
        }
        for e in rows
    ]


def _prompt_mask(batch: int, context: int, mixed: bool) -> torch.Tensor | None:
    """Left-padding mask of a batch whose prompt lengths spread evenly over [context/2, context]."""
    if not mixed or batch == 1:
        return None
    lengths = torch.linspace(context // 2, context, batch).round().long()
    return (torch.arange(context)[None, :] >= (context - lengths)[:, None]).long()


def _synthetic_teacher_cache(model, batch: int, context: int):
    """A KV cache of `context` random keys/values per layer (decode costs what it costs after a prefill)."""
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    for layer in range(cfg.num_hidden_layers):
        k = torch.empty(batch, cfg.num_key_value_heads, context, head_dim, dtype=dtype).normal_()
        cache.update(k, torch.empty_like(k).normal_(), layer)
    return cache


def worker(args: argparse.Namespace) -> dict:
    """One (model, dtype, context, batch) measurement; its own process, so that RSS figures are not mixed."""
    torch.set_num_threads(args.threads)
    model = build_models(args, args.worker)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    gc.collect()
    context, batch = args.context, args.batch
    synthetic = args.synthetic_from is not None and context >= args.synthetic_from
    mask = _prompt_mask(batch, context, args.mixed_lengths)
    ids = torch.randint(3, args.vocab, (batch, context), generator=torch.Generator().manual_seed(1))
    prefill_s = None
    with torch.inference_mode():
        if args.worker == "teacher":
            from transformers import DynamicCache

            cache = (
                _synthetic_teacher_cache(model, batch, context)
                if synthetic
                else DynamicCache(config=model.config)
            )
        else:
            from arwkv.models import ArwkvCache

            cache = ArwkvCache(model.config)
        if synthetic:  # the student's decode cost does not depend on the context: a short real prefill
            if args.worker == "student":
                model(ids[:, :64], cache=cache, use_cache=True, logits_to_keep=1)
                cache.seen_tokens = context
            token = ids[:, -1:]
        else:
            c0 = time.process_time()
            for start in range(0, context, args.prefill_chunk):
                end = start + args.prefill_chunk
                out = model(
                    ids[:, start:end],
                    attention_mask=None if mask is None else mask[:, :end],
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            prefill_s = time.process_time() - c0
            token = out.logits[:, -1:].argmax(-1)
            del out
        gc.collect()
        peak_reset = _reset_peak_rss()
        rss_start = _proc_status("VmRSS")

        def step(token, mask):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = model(token, attention_mask=mask, cache=cache, use_cache=True)
            return out.logits[:, -1:].argmax(-1), mask

        mask = None if mask is None else torch.ones(batch, context, dtype=torch.long) if synthetic else mask
        for _ in range(2):  # warm-up steps, not timed
            token, mask = step(token, mask)
        best_cpu = best_wall = float("inf")
        for _ in range(args.repeats):  # best of: a shared machine only ever adds time
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.decode):
                token, mask = step(token, mask)
            best_wall = min(best_wall, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        peak = _proc_status("VmHWM") if peak_reset else _proc_status("VmRSS")
        profile = _profile_decode(model, cache, token) if args.profile else None
    return {
        "model": args.worker,
        "dtype": args.dtype,
        "context": context,
        "batch": batch,
        "mixed_lengths": mask is not None,
        "synthetic_cache": synthetic,
        "prefill_tok_s": None if prefill_s is None else round(batch * context / prefill_s, 1),
        "profile": profile,
        "layers": args.layers,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "prefill_cpu_s": None if prefill_s is None else round(prefill_s, 2),
        "decode_tok_s": round(batch * args.decode / best_cpu, 2),
        "decode_tok_s_wall": round(batch * args.decode / best_wall, 2),
        "state_MiB": round(_cache_bytes(cache) / 2**20, 2),
        "decode_MiB": round((_cache_bytes(cache) + peak - rss_start) / 2**20, 1),
        "peak_rss_MiB": round(peak / 2**20, 1),
        "peak_is_hwm": peak_reset,
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="sequences decoded together")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"], help="weights")
    parser.add_argument(
        "--mixed-lengths",
        action="store_true",
        help="prompt lengths spread over [L/2, L], left-padded",
    )
    parser.add_argument(
        "--synthetic-from",
        type=int,
        help="from this context on, skip the prefill: the teacher decodes over a KV cache of random keys and "
        "values of that length (decode costs the same), the student after a 64-token prompt",
    )
    parser.add_argument("--profile", action="store_true", help="also print a per-op profile of decode steps")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--decode", type=int, default=16, help="decoded tokens per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the fastest counts")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = compute time)")
    parser.add_argument("--models", nargs="+", default=["teacher", "student"], choices=["teacher", "student"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["teacher", "student"], help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    results = []
    shared = [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in (
            "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "decode", "repeats",
            "prefill_chunk", "threads",
        )
    ]  # fmt: skip
    if args.synthetic_from is not None:
        shared.append(f"--synthetic-from={args.synthetic_from}")
    if args.mixed_lengths:
        shared.append("--mixed-lengths")
    for context in args.contexts:
        for batch in args.batches:
            for dtype in args.dtypes:
                for which in args.models:
                    cmd = [sys.executable, __file__, *shared, f"--contexts={context}", f"--worker={which}"]
                    cmd += [f"--context={context}", f"--batch={batch}", f"--dtype={dtype}"]
                    cmd += ["--profile"] if args.profile else []
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(proc.stderr, file=sys.stderr)
                        return proc.returncode
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    r = results[-1]
                    print(
                        f"  {which:7s} {dtype} ctx {context:6d} batch {batch}: decode {r['decode_tok_s']} "
                        f"tok/s, prefill {r['prefill_tok_s']} tok/s, state {r['state_MiB']} MiB",
                        file=sys.stderr,
                    )
                    for op in r["profile"] or []:
                        print(
                            f"      {op['self_ms_per_step']:9.3f} ms/step {100 * op['share']:5.1f}% "
                            f"{op['calls_per_step']:5d} calls  {op['op']}",
                            file=sys.stderr,
                        )

    header = (
        f"{'model':8s} {'dtype':5s} {'context':>8s} {'batch':>5s} {'decode tok/s':>13s} "
        f"{'prefill tok/s':>14s} {'state MiB':>10s} {'decode MiB':>11s} {'peak RSS MiB':>13s} "
        f"{'wall tok/s':>11s}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['model']:8s} {r['dtype']:5s} {r['context']:8d} {r['batch']:5d} {r['decode_tok_s']:13.2f} "
            f"{_fmt(r['prefill_tok_s'], '14.1f'):>14s} {r['state_MiB']:10.2f} {r['decode_MiB']:11.1f} "
            f"{r['peak_rss_MiB']:13.1f} {r['decode_tok_s_wall']:11.2f}"
        )
    by = {(r["model"], r["dtype"], r["context"], r["batch"]): r for r in results}
    ratios = []
    for (model, dtype, context, batch), r in by.items():
        t = by.get(("teacher", dtype, context, batch))
        teachers = [by[k] for k in by if k[0] == "teacher" and k[2:] == (context, batch)]
        if model == "student" and t:
            best = max(teachers, key=lambda q: q["decode_tok_s"])
            prefill = None
            if r["prefill_tok_s"] and t["prefill_tok_s"]:
                prefill = round(r["prefill_tok_s"] / t["prefill_tok_s"], 2)
            ratios.append(
                dict(
                    dtype=dtype,
                    context=context,
                    batch=batch,
                    decode=round(r["decode_tok_s"] / t["decode_tok_s"], 2),
                    decode_vs_fastest_teacher=round(r["decode_tok_s"] / best["decode_tok_s"], 2),
                    fastest_teacher_dtype=best["dtype"],
                    prefill=prefill,
                    state_over_kv=round(r["state_MiB"] / t["state_MiB"], 4),
                )
            )
    if ratios:
        print(
            "\nstudent / teacher (same run, same dtype):\n"
            "dtype  context batch  decode  decode vs fastest teacher  prefill  state/KV-cache"
        )
        for q in ratios:
            print(
                f"{q['dtype']:5s} {q['context']:8d} {q['batch']:5d} {q['decode']:6.2f}x "
                f"{q['decode_vs_fastest_teacher']:8.2f}x ({q['fastest_teacher_dtype']})"
                f"{_fmt(q['prefill'], '14.2f'):>14s}x {q['state_over_kv']:12.4f}"
            )
    report = {
        "layers": args.layers,
        "threads": args.threads,
        "decode_tokens": args.decode,
        "repeats": args.repeats,
        "mixed_lengths": args.mixed_lengths,
        "synthetic_from": args.synthetic_from,
        "results": results,
        "student_over_teacher": ratios,
    }
    print(json.dumps(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
