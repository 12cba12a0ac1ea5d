"""Time the RWKV-6 WKV operator on CPU: recurrence vs chunked kernel, beside RWKV-7's chunked kernel and
causal softmax attention (SDPA) of the same shapes.

    python benchmarks/wkv6.py [--quick] [--threads 1] [--clock cpu] [--json out.json]

Same conventions as benchmarks/wkv.py: forward timings under torch.no_grad, forward+backward ("fwd+bwd") under
autograd with o.sum() as the loss (SDPA: q = k = v [B, H, T, N], is_causal=True); every figure is the best of
several runs; combinations too slow to run are measured at a smaller T and scaled linearly (the recurrence is
exactly linear in T), marked `~` in the table and "extrapolated_from" in the JSON. On a shared machine use
--threads 1 --clock cpu (process CPU time: other processes' load inflates it far less than wall time) and
compare ratios from one run. Decays are RWKV-6-like (log-decay -exp(w_raw), w_raw ~ N(-3, 1)), so the chunked
kernel takes its factorized path; its sub-blocked path for extreme decays is timed as "safe-path".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

from arwkv.ops.wkv6 import CHUNK_SIZE_DEFAULT
from arwkv.ops.wkv6.chunked import wkv6_chunked
from arwkv.ops.wkv6.naive import wkv6_recurrent
from arwkv.ops.wkv7.chunked import wkv7_chunked

CHUNKS = (16, 32, 64)
REC_FWD_MAX_T = 2048  # largest T the recurrence is measured at directly
REC_BWD_MAX_T = 512
CLOCK = time.perf_counter


def make_inputs(B: int, T: int, H: int, N: int, grad: bool, w_raw_mean: float = -3.0):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)
    xs = [rnd(B, T, H, N), 0.5 * rnd(B, T, H, N), rnd(B, T, H, N), -torch.exp(rnd(B, T, H, N) + w_raw_mean)]
    xs.append(0.5 * rnd(H, N))
    return [x.requires_grad_(grad) for x in xs]


def make_wkv7_inputs(B: int, T: int, H: int, N: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, generator=g)
    kappa = F.normalize(rnd(), dim=-1)
    w = -math.exp(-0.5) * torch.sigmoid(2 * rnd())
    xs = [rnd(), w, 0.5 * rnd(), rnd(), -kappa, kappa * torch.rand(B, T, H, N, generator=g)]
    return [x.requires_grad_(grad) for x in xs]


def best_ms(fn, reps: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return 1e3 * min(times)


def fwd(fn):
    def go():
        with torch.no_grad():
            fn()

    return go


def fwd_bwd(fn, leaves):
    def go():
        for x in leaves:
            x.grad = None
        out = fn()
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    return go


def bench(args) -> dict:
    B, H, N = args.batch, args.heads, args.head_size
    results = []

    def record(T, impl, mode, ms, measured_T):
        row = dict(T=T, impl=impl, mode=mode, ms=ms * T / measured_T)
        if measured_T != T:
            row["extrapolated_from"] = measured_T
        results.append(row)
        mark = "~" if measured_T != T else " "
        print(f"  T={T:5d} {impl:15s} {mode:7s} {mark}{row['ms']:10.1f} ms", flush=True)

    for T in args.T:
        xs, xg = make_inputs(B, T, H, N, False), make_inputs(B, T, H, N, True)
        for C in CHUNKS:
            run = lambda C=C, xs=xs: wkv6_chunked(*xs, chunk_size=C)
            record(T, f"chunk{C}", "fwd", best_ms(fwd(run), args.reps), T)
            run = lambda C=C, xg=xg: wkv6_chunked(*xg, chunk_size=C)
            record(T, f"chunk{C}", "fwd+bwd", best_ms(fwd_bwd(run, xg), args.reps), T)
        strong = make_inputs(B, T, H, N, False, w_raw_mean=2.0)  # cumulative decays beyond e^-40 per chunk
        run = lambda s=strong: wkv6_chunked(*s, chunk_size=CHUNK_SIZE_DEFAULT)
        record(T, "safe-path", "fwd", best_ms(fwd(run), args.reps), T)
        x7, x7g = make_wkv7_inputs(B, T, H, N, False), make_wkv7_inputs(B, T, H, N, True)
        record(
            T,
            "wkv7-chunk16",
            "fwd",
            best_ms(fwd(lambda x7=x7: wkv7_chunked(*x7, chunk_size=16)), args.reps),
            T,
        )
        run = lambda x7g=x7g: wkv7_chunked(*x7g, chunk_size=16)
        record(T, "wkv7-chunk16", "fwd+bwd", best_ms(fwd_bwd(run, x7g), args.reps), T)
        q, qg = torch.randn(B, H, T, N), torch.randn(B, H, T, N, requires_grad=True)
        long = T >= 8192
        reps = 1 if long else args.reps
        sdpa = lambda q=q: F.scaled_dot_product_attention(q, q, q, is_causal=True)
        record(T, "sdpa", "fwd", best_ms(fwd(sdpa), reps, not long), T)
        sdpa_g = lambda qg=qg: F.scaled_dot_product_attention(qg, qg, qg, is_causal=True)
        record(T, "sdpa", "fwd+bwd", best_ms(fwd_bwd(sdpa_g, [qg]), reps, not long), T)
        Tf = min(T, REC_FWD_MAX_T)
        xs_r = [x[:, :Tf] for x in xs[:4]] + [xs[4]]
        record(T, "recurrent", "fwd", best_ms(fwd(lambda xs_r=xs_r: wkv6_recurrent(*xs_r)), args.reps), Tf)
        Tb = min(T, REC_BWD_MAX_T)
        xg_r = [x[:, :Tb].detach().requires_grad_() for x in xg[:4]] + [xg[4]]
        record(
            T, "recurrent", "fwd+bwd", best_ms(fwd_bwd(lambda xg_r=xg_r: wkv6_recurrent(*xg_r), xg_r), 1), Tb
        )
    return dict(
        config=dict(
            B=B,
            H=H,
            N=N,
            Ts=args.T,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            cpu=platform.processor() or platform.machine(),
            cores=os.cpu_count(),
            loadavg_start=args.load0,
            loadavg_end=os.getloadavg(),
            reps=args.reps,
            default_chunk=CHUNK_SIZE_DEFAULT,
            clock=args.clock,
        ),
        results=results,
    )


def table(report: dict) -> str:
    res = {(r["T"], r["impl"], r["mode"]): r for r in report["results"]}
    impls = ["recurrent", *(f"chunk{C}" for C in CHUNKS), "safe-path", "wkv7-chunk16", "sdpa"]
    c = f"chunk{report['config']['default_chunk']}"
    lines = []
    for mode in ("fwd", "fwd+bwd"):
        lines.append(f"\nwkv6 {mode} (ms, fp32; ~ = extrapolated linearly from a shorter T)")
        lines.append("     T " + "".join(f"{i:>15s}" for i in impls) + f"  rec/{c}  sdpa/{c}")
        for T in report["config"]["Ts"]:
            row = {i: res.get((T, i, mode)) for i in impls}
            cells = [
                (f"{'~' if r and 'extrapolated_from' in r else ''}{r['ms']:.1f}" if r else "-")
                for r in row.values()
            ]
            ratios = f"{row['recurrent']['ms'] / row[c]['ms']:8.1f}x {row['sdpa']['ms'] / row[c]['ms']:8.2f}x"
            lines.append(f"{T:6d} " + "".join(f"{x:>15s}" for x in cells) + "  " + ratios)
    return "\n".join(lines)


def targets(report: dict) -> str:
    """Issue 13's acceptance ratios (fp32 forward, default chunk size), where this run measured them."""
    res = {(r["T"], r["impl"], r["mode"]): r["ms"] for r in report["results"]}
    c = f"chunk{report['config']['default_chunk']}"
    out = []
    for name, a, b, need in (
        ("fwd recurrent/chunked T=2048", (2048, "recurrent", "fwd"), (2048, c, "fwd"), 5),
        ("fwd sdpa/chunked T=8192", (8192, "sdpa", "fwd"), (8192, c, "fwd"), 1),
    ):
        if a in res and b in res:
            ratio = res[a] / res[b]
            out.append(f"  {name}: {ratio:.1f}x (need >= {need}x) {'MET' if ratio >= need else 'NOT MET'}")
    return f"targets (fp32, chunk_size={CHUNK_SIZE_DEFAULT}):\n" + "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T in {512, 2048}, fewer repetitions")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement (best is kept)")
    p.add_argument(
        "--clock", choices=["wall", "cpu"], default="cpu", help="cpu: process CPU time (shared machines)"
    )
    args = p.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    args.T = [512, 2048] if args.quick else [512, 2048, 8192]
    args.reps = args.reps or (2 if args.quick else 5)
    args.load0 = os.getloadavg()
    print(
        f"B={args.batch} H={args.heads} N={args.head_size} threads={args.threads} clock={args.clock} "
        f"load={args.load0}"
    )
    report = bench(args)
    print(table(report))
    print(targets(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
